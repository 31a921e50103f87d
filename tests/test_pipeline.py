"""The Snakemake pipeline (Snakefile, workflow/): DAG shape, an end-to-end quick run, and what
a re-run does after a change (docs/design.md section 8).

Snakemake runs as a subprocess in a temporary copy of the workflow, so that runs and edits
never touch the checkout. The quick config (tiny random Llama) runs the whole DAG once, in
about a minute and a half on 2 cores; every other check is a dry run against that result.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.workflow_runs import QUICK, copy_workflow, job_counts, snakemake

pytest.importorskip("snakemake")


def dry_run(workdir: Path, *configfiles: str) -> dict[str, int]:
    result = snakemake(workdir, "--dry-run", "--configfile", *configfiles)
    return job_counts(result.stdout + result.stderr)


def write_config(workdir: Path, name: str, text: str) -> str:
    (workdir / name).write_text(text)
    return name


# The quick sweep's jobs: 1 model (2 traces: layers 0 and 1 x head 0), synthetic d 16 x b {2, 3}
# x {mse, prod}, 4 cache settings (a KIVI-style baseline with its own group size, a keys-only one
# with its own residual window) on each trace, in compare mode and for perplexity, and the
# per-layer sensitivity of its 2 layers (the exact references of the perplexity and of the
# per-layer windows, one each), and one needle run (2 bits, one short haystack).
QUICK_JOBS = {
    "hf_checkpoint": 1,
    "bundle": 1,
    "corpus": 1,
    "traces": 2,
    "synthetic": 4,
    "trace_eval": 10,
    "compare_exact": 1,
    "compare": 5,
    "perplexity_exact": 2,
    "perplexity": 5,
    "layer_sensitivity": 2,
    "key_stats": 1,
    "needle": 1,
    "aggregate": 1,
    "report": 1,
    "all": 1,
}
# The default sweep: two models (SmolLM2, Qwen2.5-Coder), each converted, exported, its keys
# measured, an exact baseline, two perplexity references and one needle job; traces 2 layers x 3
# KV heads (SmolLM2) and 2 x 2 (Qwen): 10; synthetic d {64, 128} x b 1..4 x {mse, prod} less Prod
# at b = 1 (14); 19 cache settings, 18 on each model (Prod on SmolLM2 only, the exact-layer set on
# Qwen only), in compare mode and for perplexity (36 each), on each trace less those that differ
# only in exact layers (17 x 6 + 16 x 4 = 166); 30 + 24 layers alone.
DEFAULT_JOBS = QUICK_JOBS | {
    "hf_checkpoint": 2,
    "bundle": 2,
    "key_stats": 2,
    "compare_exact": 2,
    "perplexity_exact": 4,
    "needle": 2,
    "traces": 10,
    "synthetic": 14,
    "trace_eval": 166,
    "compare": 36,
    "perplexity": 36,
    "layer_sensitivity": 54,
}


def test_dry_run_dag_of_the_quick_config(tmp_path_factory):
    assert dry_run(copy_workflow(tmp_path_factory.mktemp("dag-quick")), QUICK) == QUICK_JOBS


def test_dry_run_dag_of_the_default_config(tmp_path_factory):
    result = snakemake(copy_workflow(tmp_path_factory.mktemp("dag-default")), "--dry-run")
    assert job_counts(result.stdout + result.stderr) == DEFAULT_JOBS


def test_quick_run_writes_the_report(quick_workdir, quick_run):
    assert job_counts(quick_run.stdout + quick_run.stderr) == QUICK_JOBS
    report = (quick_workdir / "results" / "report.md").read_text()
    for section in ("## Headline", "## 1. Distortion", "## 2a.", "## 2b.", "## 3. Perplexity", "## 4."):
        assert section in report
    for figure in (
        "distortion_vs_bits",
        "quality_trace",
        "quality_compare",
        "perplexity-tiny-llama",
        "key_statistics",
        "throughput",
    ):
        assert (quick_workdir / "results" / f"{figure}.png").stat().st_size > 0
    rows = (quick_workdir / "results" / "summary.csv").read_text().strip().splitlines()
    # header + 4 synthetic + 10 trace + 1 baseline + 5 compare + 5 perplexity + 2 layer sensitivity
    # + 1 needle
    assert len(rows) == 1 + 28
    for log in ("bundle/tiny-llama.log", "aggregate.log"):
        assert (quick_workdir / "results" / "logs" / log).is_file()


def test_a_second_run_does_nothing(quick_workdir, quick_run):
    result = snakemake(quick_workdir, "--configfile", QUICK)
    assert "Nothing to be done" in result.stdout + result.stderr
    assert job_counts(result.stdout + result.stderr) == {}


def test_a_new_bit_width_adds_only_its_jobs(quick_workdir, quick_run):
    extra = write_config(
        quick_workdir,
        "more-bits.yaml",
        "kv_caches:\n"
        "  - {key_bits: 2, value_bits: 2}\n"
        "  - {key_bits: 3.5, value_bits: 3.5}\n"
        "  - {key_bits: 4, key_strategy: prod, value_bits: 4}\n",
    )
    assert dry_run(quick_workdir, QUICK, extra) == {
        "trace_eval": 2,  # the new setting on each of the 2 traces
        "compare": 1,
        "perplexity": 1,
        "aggregate": 1,
        "report": 1,
        "all": 1,
    }


def test_a_trace_parameter_reruns_traces_and_their_dependents(quick_workdir, quick_run):
    extra = write_config(quick_workdir, "shorter-traces.yaml", "traces:\n  max_seq: 48\n")
    assert dry_run(quick_workdir, QUICK, extra) == {
        "traces": 2,
        "trace_eval": 10,
        "aggregate": 1,
        "report": 1,
        "all": 1,
    }


def _jobs_after_editing(workdir: Path, module: str) -> dict[str, int]:
    """The dry run's jobs after appending a comment to tq module file ``module`` (restored after)."""
    source = workdir / module
    original = source.read_text()
    source.write_text(original + "\n# edited\n")
    try:
        return dry_run(workdir, QUICK)
    finally:
        source.write_text(original)


def test_a_library_edit_reruns_the_jobs_that_import_it(quick_workdir, quick_run):
    assert _jobs_after_editing(quick_workdir, "tq/tasks/perplexity.py") == {
        "perplexity_exact": 2,
        "perplexity": 5,
        "layer_sensitivity": 2,
        "aggregate": 1,
        "report": 1,
        "all": 1,
    }
    assert dry_run(quick_workdir, QUICK) == {}


def test_a_report_section_edit_reruns_only_the_report(quick_workdir, quick_run):
    assert _jobs_after_editing(quick_workdir, "tq/report/needle.py") == {
        "aggregate": 1,
        "report": 1,
        "all": 1,
    }


def test_a_cache_edit_reruns_no_model_corpus_or_trace_job(quick_workdir, quick_run):
    """The jobs that export models, extract the corpus or record traces never quantize: an edit
    to the cache store is not in their code (tq.pipeline.sources), while every job that
    quantizes with it re-runs."""
    jobs = _jobs_after_editing(quick_workdir, "tq/cache/kvcache.py")
    assert not set(jobs) & {"hf_checkpoint", "bundle", "corpus", "traces", "synthetic"}
    assert {"trace_eval", "compare", "perplexity", "layer_sensitivity", "needle"} <= set(jobs)


def test_a_setting_carries_its_own_cache_options(quick_workdir, quick_run):
    """config/quick.yaml's keys-only setting has its own residual window (label suffix -r8)."""
    record = json.loads((quick_workdir / "results/perplexity/tiny-llama/k2mse-v2exact-r8.json").read_text())
    assert record["config"]["cache"]["residual_length"] == 8
    assert record["config"]["cache"]["value_strategy"] == "exact"
    shared = json.loads((quick_workdir / "results/perplexity/tiny-llama/k2mse-v2mse.json").read_text())
    assert shared["config"]["cache"]["residual_length"] == 0
    kivi = json.loads((quick_workdir / "results/perplexity/tiny-llama/k2kivi-v2kivi-g16.json").read_text())
    assert kivi["config"]["cache"]["group_size"] == 16


def test_layer_sensitivity_quantizes_one_layer_at_a_time(quick_workdir, quick_run):
    for layer in (0, 1):
        path = quick_workdir / f"results/layer_sensitivity/tiny-llama/layer{layer:02d}.json"
        config = json.loads(path.read_text())["config"]
        assert config["quantized_layers"] == [layer]
        assert config["exact_layers"] == [1 - layer]
    assert "## 5. Per-layer sensitivity" in (quick_workdir / "results/report.md").read_text()


def test_lint_passes(quick_workdir):
    result = snakemake(quick_workdir, "--lint")
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("synthetic:\n  bits: [9]\n", "bits"),
        ("kv_caches:\n  - {key_bits: 3, value_bits: 3, key_strategy: fast}\n", "key_strategy"),
        ("perplexity:\n  protocol: sliding\n", "protocol"),
        ("models:\n  - {preset: gpt5, trace_layers: [0], trace_heads: [0]}\n", "preset"),
    ],
)
def test_a_bad_config_value_stops_the_run_naming_the_key(quick_workdir, override, key):
    extra = write_config(quick_workdir, "bad.yaml", override)
    result = snakemake(quick_workdir, "--dry-run", "--configfile", QUICK, extra, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "ValidationError" in output
    assert re.search(rf"\['{key}'\]", output), output


def test_a_deleted_record_and_summary_come_back(quick_workdir, quick_run):
    """rule all names every record and summary.csv: deleting them (as after a failed aggregate)
    makes the next run rebuild both, although report.md still exists."""
    record = quick_workdir / "results/perplexity/tiny-llama/k2mse-v2mse.json"
    summary = quick_workdir / "results/summary.csv"
    record.unlink()
    summary.unlink()
    result = snakemake(quick_workdir, "--configfile", QUICK)
    assert job_counts(result.stdout + result.stderr) == {
        "perplexity": 1,
        "aggregate": 1,
        "report": 1,
        "all": 1,
    }
    assert record.is_file() and summary.is_file()
