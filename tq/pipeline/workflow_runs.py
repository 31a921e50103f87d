"""Running the Snakemake workflow from outside it: a private copy of the workflow, Snakemake as a
subprocess, and its job table. For the cluster benchmark (benchmarks/slurm_walltime.py) and the
pipeline and cluster tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from tq.core.codebook import cache_dir

__all__ = ["WORKFLOW_FILES", "copy_workflow", "job_counts", "run_snakemake"]

# What the workflow needs: the Snakefile and its files, the configs, the prompts, and tq's
# sources (their hash goes into each rule's params).
WORKFLOW_FILES = ("Snakefile", "config.yaml", "config", "workflow", "profiles", "envs", "prompts", "tq")


def copy_workflow(source: Path, dest: Path) -> Path:
    """Copy what the workflow needs from the checkout ``source`` into ``dest`` (created if
    missing); return ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, dest / name)
    return dest


def run_snakemake(
    workdir: Path, *args: str, env: Mapping[str, str] | None = None, timeout_s: float = 600
) -> subprocess.CompletedProcess:
    """Run Snakemake in ``workdir`` (cores: all, from the workflow's default profile) and return
    its result, whatever its exit status.

    ``TQ_CACHE_DIR`` is this process's cache directory (:func:`tq.core.codebook.cache_dir`, made
    absolute), so that the corpus and model files there are reused; ``env`` adds or overrides
    variables.
    """
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=os.environ
        | {"PYTHONUNBUFFERED": "1", "TQ_CACHE_DIR": str(cache_dir().absolute())}
        | dict(env or {}),
    )


def job_counts(output: str) -> dict[str, int]:
    """The "Job stats" table of a Snakemake run or dry run: rule -> jobs ({} if none)."""
    match = re.search(r"Job stats:\njob\s+count\n[- ]+\n(.*?)\ntotal\s+\d+", output, re.S)
    if match is None:
        return {}
    return {rule: int(count) for rule, count in (line.split() for line in match.group(1).splitlines())}
