"""Writing report.md and its figures: the sections of :data:`tq.report.sections.REGISTRY`, in order,
under a title and a count of the records."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tq.core.fileio import atomic_write_bytes
from tq.report.flatten import COORDINATES, typed
from tq.report.inputs import ReportInputs
from tq.report.sections import REGISTRY
from tq.report.uncertainty import window_errors_only
from tq.report.windows import WindowValues

REPORT_NAME = "report.md"


def write_report(
    table: pd.DataFrame,
    out: str | os.PathLike,
    title: str = "TurboQuant KV-cache evaluation",
    per_window: pd.DataFrame | None = None,
    key_stats: Sequence[dict[str, Any]] = (),
) -> Path:
    """Write the markdown report and its PNG plots; return the report's path.

    ``table``: :func:`tq.report.flatten.summary_table` of the records (summary.csv). ``out`` is
    the report file (``*.md``) or a directory for ``report.md``; plots go next to the report under
    the names of the sections' figures (tq.report.sections.REGISTRY), each written only when its
    section has records. Every section of the registry is written in order, under its heading;
    one without records says so in a line. Real-model figures are shown as "value ± SE" where the
    records carry standard errors with the window (perplexity) or the prompt (compare mode) as the
    unit, and plots draw their 95% error bars. ``per_window``:
    :func:`tq.report.flatten.per_window_table` of the records (per_window.csv), from which findings
    compare two perplexity settings by their paired per-window differences
    (:func:`tq.report.uncertainty.paired_nll`; without it, no two settings are told apart); a
    setting is compared with exact by its own standard error
    (:func:`tq.report.uncertainty.against_exact`). ``key_stats``: per-layer key statistics records
    (tq.tasks.key_stats), shown in the cross-model section with ``key_statistics.png``.
    Everything is written atomically.

    Raises:
        ReportError: a report row would pool two records of one setting.
    """
    out = Path(out)
    path = out if out.suffix == ".md" else out / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    table = typed(table.reindex(columns=[*COORDINATES, *table.columns.difference(COORDINATES, sort=False)]))
    inputs = ReportInputs(window_errors_only(table), WindowValues(per_window), key_stats, path.parent)
    counts = table.groupby(["source", "workload"], dropna=False).size()
    lines = [
        f"# {title}",
        "",
        f"Generated from {len(table)} result record{'s' if len(table) != 1 else ''}"
        + (
            ": " + ", ".join(f"{count} {workload}" for (_, workload), count in counts.items())
            if len(table)
            else ""
        )
        + ".",
        "",
    ]
    for section in REGISTRY:
        lines += [f"## {section.title}", "", *section.write(inputs)]
    atomic_write_bytes(path, "\n".join(lines).rstrip("\n").encode() + b"\n")
    return path
