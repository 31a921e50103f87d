"""Running the Snakemake workflow from tests: tq.pipeline.workflow_runs with the test session's
persistent cache, and a failed run reported as a test failure. Shared by the pipeline, cluster,
report and docs tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tq.pipeline import workflow_runs
from tq.pipeline.workflow_runs import job_counts

__all__ = ["QUICK", "ROOT", "copy_workflow", "job_counts", "snakemake"]

ROOT = Path(__file__).resolve().parent.parent
QUICK = "config/quick.yaml"
SNAKEMAKE_TIMEOUT_S = 600


def snakemake(
    workdir: Path,
    *args: str,
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout_s: float = SNAKEMAKE_TIMEOUT_S,
) -> subprocess.CompletedProcess:
    """Run Snakemake in ``workdir`` (:func:`tq.pipeline.workflow_runs.run_snakemake`) with
    ``TQ_CACHE_DIR`` the persistent cache as the test session found it, so that the Wikipedia
    wheel and text are reused between sessions; ``env`` adds or overrides variables. A failed
    run fails the test unless ``check`` is false."""
    from tests.conftest import PERSISTENT_CACHE_DIR

    result = workflow_runs.run_snakemake(
        workdir, *args, env={"TQ_CACHE_DIR": str(PERSISTENT_CACHE_DIR)} | (env or {}), timeout_s=timeout_s
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"snakemake {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def copy_workflow(dest: Path) -> Path:
    """Copy what the workflow needs from this checkout into ``dest`` (created if missing)."""
    return workflow_runs.copy_workflow(ROOT, dest)
