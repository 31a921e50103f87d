"""Result records: one JSON object per measurement (docs/design.md section 4), written atomically.

``{"schema": "tq.result/1", "source": ..., "config": {...}, "metrics": {...}, "timing": {...},
"env": {...}, "created": ISO time}``
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Any

import numba
import numpy as np

from tq import __version__
from tq.core.fileio import write_json

SCHEMA = "tq.result/1"
SOURCES = ("synthetic", "trace", "real-model")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int) -> dict[str, Any]:
    """Versions and hardware the measurement ran on."""
    return {
        "tq": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "gpu": None,
    }


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second: a record's or a benchmark result's ``created``."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def make_record(
    source: str, config: dict[str, Any], metrics: dict[str, Any], timing: dict[str, Any], threads: int
) -> dict[str, Any]:
    """Assemble a result record; ``source`` is "synthetic", "trace" or "real-model"."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    return {
        "schema": SCHEMA,
        "source": source,
        "config": config,
        "metrics": metrics,
        "timing": timing,
        "env": environment(threads),
        "created": now_iso(),
    }


def write_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write a record as JSON, atomically (no half-written file under the final name)."""
    write_json(path, record)


def output_path_problem(path: str | os.PathLike) -> str | None:
    """Why a result file could not be written at ``path`` now, or None when it could.

    Checked before a long run starts, so that a bad path fails at once instead of losing the
    result at the end: an empty path, an existing directory, a parent that is a file, or a
    directory (the nearest existing one, for directories that would be created) without write
    permission.
    """
    if not str(path):
        return "an empty path"
    path = Path(path)
    if path.is_dir():
        return f"{path} is a directory"
    if path.exists() and not os.access(path, os.W_OK):
        return f"{path} exists and is not writable"
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory, so {path} cannot be created"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create files in {parent} (no write permission)"
    return None
