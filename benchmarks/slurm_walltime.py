"""Wall time of a workflow config run locally vs submitted to a single-node SLURM cluster.

    .venv/bin/python benchmarks/slurm_walltime.py [--configfile config/quick.yaml] --json OUT.json

Three runs, each from an empty results directory in its own copy of the workflow, one after the
other on the same machine: local, SLURM with profiles/slurm as it is (job grouping on), and SLURM
with the profile's `groups` and `group-components` removed. The cluster is the test cluster of
tq.pipeline.slurm_cluster (root and Debian's SLURM packages needed). Writes {local_seconds,
slurm_seconds, ratio, slurm_jobs, ungrouped: {slurm_seconds, ratio, slurm_jobs}, ...}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tq.core.fileio import write_json
from tq.pipeline.slurm_cluster import SingleNodeSlurm, missing_requirements
from tq.pipeline.workflow_runs import copy_workflow, job_counts, run_snakemake
from tq.tasks.records import now_iso

ROOT = Path(__file__).resolve().parent.parent  # the checkout whose workflow is run


def timed_run(workdir: Path, *args: str, env: dict[str, str] | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    result = run_snakemake(workdir, *args, env=env, timeout_s=3600)
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"snakemake {' '.join(args)} failed:\n{output[-4000:]}")
    return seconds, output


def slurm_run(cluster: SingleNodeSlurm, workdir: Path, configfile: str) -> dict[str, float | int]:
    """Run ``configfile`` from ``workdir`` through its profiles/slurm; seconds and SLURM job count.

    The count is of the jobs this run submitted: the controller also remembers an earlier run's.
    """
    before = set(cluster.jobs())
    print(f"SLURM run of {configfile} in {workdir.name} ...", file=sys.stderr)
    arguments = ("--profile", "profiles/slurm", "--configfile", configfile)
    seconds, _ = timed_run(workdir, *arguments, env=cluster.env)
    return {"slurm_seconds": seconds, "slurm_jobs": len(set(cluster.jobs()) - before)}


def drop_grouping(profile: Path) -> None:
    """Remove the job grouping (``groups``, ``group-components``) from a copied SLURM profile."""
    settings = yaml.safe_load(profile.read_text())
    for key in ("groups", "group-components"):
        settings.pop(key, None)
    profile.write_text(yaml.safe_dump(settings, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", default="config/quick.yaml")
    parser.add_argument("--json", type=Path, required=True, help="where to write the result")
    args = parser.parse_args()
    reason = missing_requirements()
    if reason is not None:
        raise SystemExit(f"cannot start the SLURM test cluster: {reason}")

    with tempfile.TemporaryDirectory(prefix="tq-slurm-bench-") as scratch:
        scratch = Path(scratch)
        local_dir = copy_workflow(ROOT, scratch / "local")
        print(f"local run of {args.configfile} ...", file=sys.stderr)
        local_seconds, local_output = timed_run(local_dir, "--configfile", args.configfile)
        with SingleNodeSlurm(scratch / "cluster") as cluster:
            grouped = slurm_run(cluster, copy_workflow(ROOT, scratch / "grouped"), args.configfile)
            ungrouped_dir = copy_workflow(ROOT, scratch / "ungrouped")
            drop_grouping(ungrouped_dir / "profiles/slurm/config.yaml")
            ungrouped = slurm_run(cluster, ungrouped_dir, args.configfile)

    record = {
        "benchmark": "slurm_walltime",
        "configfile": args.configfile,
        "jobs": sum(job_counts(local_output).values()),
        "local_seconds": local_seconds,
        "slurm_jobs": grouped["slurm_jobs"],
        "slurm_seconds": grouped["slurm_seconds"],
        "ratio": grouped["slurm_seconds"] / local_seconds,
        "ungrouped": ungrouped | {"ratio": ungrouped["slurm_seconds"] / local_seconds},
        "cluster": f"single node, {cluster.cpus} CPUs, {cluster.memory_mb} MB",
        "created": now_iso(),
    }
    write_json(args.json, record)
    print(
        f"{args.configfile}: local {local_seconds:.1f} s; SLURM {record['slurm_seconds']:.1f} s "
        f"({record['slurm_jobs']} SLURM jobs, ratio {record['ratio']:.2f}); without grouping "
        f"{ungrouped['slurm_seconds']:.1f} s ({ungrouped['slurm_jobs']} jobs, "
        f"ratio {record['ungrouped']['ratio']:.2f})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
