"""Cluster submission for real: the quick config through Snakemake's SLURM executor
(profiles/slurm) on a single-node SLURM cluster started for this module (tq/pipeline/slurm_cluster.py,
docs/design.md section 9).

Checks that every non-local job ran as a SLURM job (its id, final state and resources as the
scheduler reports them), that a rule's ``gpu`` resource reaches the scheduler as ``--gpus``, and
that the results equal a local run's. Skipped, with the reason, where the SLURM packages are not
installed or the process is not root (the daemons run as root); `make test` installs them with
apt where it can.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import pytest

from tests.workflow_runs import QUICK, ROOT, copy_workflow, job_counts, snakemake
from tq.pipeline.slurm_cluster import SYSTEM_CONF, SingleNodeSlurm, _is_stale_link, missing_requirements

pytest.importorskip("snakemake_executor_plugin_slurm")

# Rules that Snakemake runs on the submitting host (localrules), not as SLURM jobs.
LOCAL_RULES = {"all", "aggregate", "report", "corpus"}
# Threads each rule declares (workflow/rules/*.smk): SLURM's NumCPUs for its jobs.
RULE_THREADS = {
    "synthetic": 1,
    "hf_checkpoint": 2,
    "bundle": 2,
    "traces": 1,
    "trace_eval": 1,
    "compare_exact": 2,
    "compare": 1,
    "perplexity_exact": 2,
    "perplexity": 1,
    "layer_sensitivity": 1,
    "key_stats": 2,
    "needle": 2,
}
# Columns that are measured times (or ratios of times) or stamps, not results.
TIMING_COLUMNS = re.compile(r"^timing\.|^created$|^decode_speed_ratio$")
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/(rule|group)_(\w+)/")
# The submitting host's cores (profiles/default: cores: all): the most CPUs a group job asks for.
HOST_CORES = os.cpu_count()


def profile_groups() -> dict[str, str]:
    """rule -> group, from the groups of profiles/slurm/config.yaml."""
    import yaml

    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    return dict(entry.split("=") for entry in profile["groups"])


def require_cluster_packages() -> None:
    reason = missing_requirements()
    if reason is not None:
        pytest.skip(f"no SLURM test cluster: {reason}")


def test_a_failing_body_still_stops_every_daemon(tmp_path):
    """Runs before the module's cluster starts (one cluster at a time owns /etc/slurm/slurm.conf)."""
    require_cluster_packages()
    cluster = SingleNodeSlurm(tmp_path)
    with pytest.raises(RuntimeError, match="test body failed"), cluster:
        pids = cluster.daemon_pids()
        assert sorted(pids) == ["munged", "slurmctld", "slurmd"]
        raise RuntimeError("test body failed")
    for name, pid in pids.items():
        assert not Path(f"/proc/{pid}").exists(), f"{name} (pid {pid}) is still running"
    assert not SYSTEM_CONF.is_symlink()


@pytest.mark.parametrize(
    ("files", "stale"),
    [
        ({}, False),  # a configuration this module did not write: never replaced
        ({"munge.key": "key"}, True),  # a test cluster's directory without a running controller
        ({"munge.key": "key", "slurmctld.pid": "not a pid"}, True),
        ({"munge.key": "key", "slurmctld.pid": str(os.getpid())}, False),  # its controller runs
    ],
)
def test_a_link_left_by_a_killed_cluster_is_stale(tmp_path, files, stale):
    conf = tmp_path / "cluster" / "slurm.conf"
    conf.parent.mkdir()
    conf.write_text("ClusterName=tq-test\n")
    for name, text in files.items():
        (conf.parent / name).write_text(text)
    link = tmp_path / "etc-slurm.conf"
    link.symlink_to(conf)
    assert _is_stale_link(link) is stale
    assert not _is_stale_link(conf)  # a real file is never stale
    conf.unlink()
    assert _is_stale_link(link)  # its directory's configuration is gone


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The node offers twice this machine's CPUs. The quick config's jobs spend most of their time
    starting up (about 4 s of SLURM and Snakemake start-up against about 2 s of work each), so two
    of them side by side take about 140 s instead of 195 s on 2 cores. The tests check states,
    resources and results, not speed; benchmarks/slurm_walltime.py times a node of real size."""
    require_cluster_packages()
    with SingleNodeSlurm(tmp_path_factory.mktemp("slurm"), cpus=2 * (os.cpu_count() or 1)) as running:
        yield running


@pytest.fixture(scope="module")
def cluster_run(cluster, tmp_path_factory):
    """The quick config submitted to the cluster; synthetic jobs also request one (fake) GPU."""
    work = copy_workflow(tmp_path_factory.mktemp("pipeline-slurm"))
    result = snakemake(
        work,
        "--profile",
        "profiles/slurm",
        "--configfile",
        QUICK,
        "--set-resources",
        "synthetic:gpu=1",
        env=cluster.env,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"snakemake on SLURM failed:\n{result.stdout}\n{result.stderr}\n{cluster.logs()}")
    return work, result.stdout + result.stderr


def submitted_jobs(output: str) -> dict[str, tuple[str, str]]:
    """SLURM job id -> ("rule", rule) or ("group", group), from Snakemake's submission messages."""
    # A group job's log directory is group_<group>_<its rules>.
    return {
        job_id: (kind, name.split("_")[0] if kind == "group" else name)
        for job_id, kind, name in SUBMITTED.findall(output)
    }


def results_table(workdir: Path) -> pd.DataFrame:
    """summary.csv without timing columns, columns and rows in a fixed order."""
    table = pd.read_csv(workdir / "results" / "summary.csv")
    columns = sorted(c for c in table.columns if not TIMING_COLUMNS.search(c))
    return table[columns].sort_values(columns).reset_index(drop=True)


def test_every_job_ran_as_a_completed_slurm_job(cluster, cluster_run):
    """Ungrouped rules: one SLURM job each, with the rule's threads; the grouped rules
    (profiles/slurm groups) ran inside their group jobs, so fewer jobs were submitted."""
    _, output = cluster_run
    groups = profile_groups()
    submitted = submitted_jobs(output)
    expected = {rule: n for rule, n in job_counts(output).items() if rule not in LOCAL_RULES}
    single = sorted(name for kind, name in submitted.values() if kind == "rule")
    assert single == sorted(rule for rule, n in expected.items() if rule not in groups for _ in range(n))
    assert {name for kind, name in submitted.values() if kind == "group"} == {
        groups[rule] for rule in expected if rule in groups
    }
    assert len(submitted) < sum(expected.values())
    scheduler = cluster.jobs()
    for job_id, (kind, name) in submitted.items():
        job = scheduler[job_id]
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), (name, job)
        if kind == "rule":
            assert int(job["NumCPUs"]) == RULE_THREADS[name], (name, job)
        else:
            assert 1 <= int(job["NumCPUs"]) <= HOST_CORES, (name, job)


def test_rule_resources_reach_the_scheduler(cluster, cluster_run):
    _, output = cluster_run
    scheduler = cluster.jobs()
    for job_id, (_, name) in submitted_jobs(output).items():
        job = scheduler[job_id]
        gpus = job.get("TresPerJob", "")
        if name == "synthetic":
            assert gpus.endswith("gpu:1"), job
        else:
            assert "gpu" not in gpus, job
        if name == "model":  # hf_checkpoint (6000 MB, 15 min) then bundle (8000 MB, 20 min)
            assert job["MinMemoryNode"] == "8000M", job
            assert job["TimeLimit"] == "00:35:00", job


def test_results_equal_a_local_run(quick_workdir, quick_run, cluster_run):
    workdir, _ = cluster_run
    assert (workdir / "results" / "report.md").is_file()
    pd.testing.assert_frame_equal(results_table(workdir), results_table(quick_workdir))
