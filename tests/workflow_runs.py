"""Running the Snakemake workflow from tests: a private copy of the workflow, Snakemake as a
subprocess, and its job table. Shared by the pipeline and cluster tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What the workflow needs: the Snakefile and its files, the configs, the prompts, and tq's
# sources (their hash goes into each rule's params).
WORKFLOW_FILES = ("Snakefile", "config.yaml", "config", "workflow", "profiles", "envs", "prompts", "tq")
QUICK = "config/quick.yaml"
SNAKEMAKE_TIMEOUT_S = 600


def snakemake(
    workdir: Path,
    *args: str,
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout_s: float = SNAKEMAKE_TIMEOUT_S,
) -> subprocess.CompletedProcess:
    """Run Snakemake in ``workdir`` (cores: all, from the workflow's default profile).

    ``TQ_CACHE_DIR`` is the persistent cache as the test session found it, so that the
    Wikipedia wheel and text are reused between sessions; ``env`` adds or overrides variables.
    """
    from tests.conftest import PERSISTENT_CACHE_DIR

    result = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=os.environ | {"PYTHONUNBUFFERED": "1", "TQ_CACHE_DIR": str(PERSISTENT_CACHE_DIR)} | (env or {}),
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"snakemake {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def job_counts(output: str) -> dict[str, int]:
    """The "Job stats" table of a Snakemake run or dry run: rule -> jobs ({} if none)."""
    match = re.search(r"Job stats:\njob\s+count\n[- ]+\n(.*?)\ntotal\s+\d+", output, re.S)
    if match is None:
        return {}
    return {rule: int(count) for rule, count in (line.split() for line in match.group(1).splitlines())}


def copy_workflow(dest: Path) -> Path:
    """Copy what the workflow needs into ``dest`` (created if missing); return ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest / name)
    return dest
