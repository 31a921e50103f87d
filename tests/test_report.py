"""The report: records in, one flat table, a CSV that round-trips, markdown with valid PNG plots."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.linalg import hadamard

from tests.workflow_runs import QUICK, ROOT, copy_workflow, snakemake
from tq.cache.config import CacheConfig
from tq.core.fileio import write_json
from tq.data.trace import KvTrace
from tq.report import (
    BARS_NOTE,
    COORDINATES,
    REGISTRY,
    WINDOW_SETTINGS,
    Z95,
    Paired,
    RecordError,
    ReportError,
    load_records,
    markdown_table,
    paired_nll,
    per_token_table,
    per_window_table,
    read_per_token,
    read_per_window,
    read_summary,
    summary_table,
    sweep_figures,
    write_per_token,
    write_per_window,
    write_report,
    write_summary,
)
from tq.report.compare import few_scored_tokens
from tq.report.grouping import mean_by
from tq.report.markdown import plus_minus
from tq.report.plotting import finish_axis, new_figure, plot_lines
from tq.report.uncertainty import against_exact, ranking
from tq.report.windows import WindowValues
from tq.tasks.records import make_record
from tq.tasks.stats import PER_TOKEN_FIELDS, cluster_mean_se
from tq.tasks.synthetic import run_synthetic
from tq.tasks.trace_eval import run_trace

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SECTIONS = (
    "## Headline",
    "## 1. Distortion vs bits",
    "## 2a. Attention quality vs bits",
    "## 2b. Next-token quality vs bits",
    "## Across models",
    "## 3. Perplexity and KV memory vs bits",
    "## 4. Throughput",
    "## 5. Per-layer sensitivity",
    "## 6. Compared to what",
    "## 7. Ablations",
    "## 8. Needle in a haystack",
    "## What these numbers mean",
)
PLOTS = (
    "distortion_vs_bits.png",
    "quality_trace.png",
    "quality_compare.png",
    "perplexity-tiny-llama.png",
    "throughput.png",
    "layer_sensitivity.png",
    "needle.png",
)


def _trace(layer: int) -> KvTrace:
    rng = np.random.default_rng(layer)
    keys = rng.standard_normal((2, 40, 32)).astype(np.float32)
    values = rng.standard_normal((2, 40, 32)).astype(np.float32)
    positions = np.sort(rng.choice(np.arange(4, 40), size=(2, 4), replace=False), axis=1).astype(np.int64)
    queries = np.take_along_axis(keys, positions[:, :, None], axis=1) + rng.standard_normal((2, 4, 32))
    return KvTrace(keys, values, queries.astype(np.float32), positions, "tiny-test", layer, 0, "none")


def _compare_record(bits: float, strategy: str = "mse", agreement: float = 0.9) -> dict:
    """A real-model compare record with the fields tq.tasks.compare writes."""
    cache = CacheConfig(key_bits=bits, value_bits=bits, key_strategy=strategy)
    config = {
        "workload": "real-model",
        "bundle": "/bundles/tiny",
        "model": "tiny-llama",
        "mode": "compare",
        "prompts": 2,
        "max_new_tokens": 8,
        "top_k": 5,
        "threads": 2,
        "cache": cache.describe(),
        "exact_layers": [0, 3],
        "note": "float attention",
    }
    metrics = {
        "exact_kv": {"kv_nbytes": 4096, "kv_float_nbytes": 4096, "kv_compression_ratio": 1.0},
        "quantized_kv": {"kv_nbytes": 1024, "kv_float_nbytes": 4096, "kv_compression_ratio": 32 / bits},
        "logit_rmse": 0.5 / bits,
        "topk_agreement": agreement,
        "top1_agreement": agreement,
        "kl_divergence": 0.2 / bits,
        "cross_entropy": 1.1,
        "perplexity": 3.0,
        "exact_cross_entropy": 1.0,
        "token_match_rate": agreement,
        "divergence_rate": 0.5,
        "first_divergence_steps": [3, None],
        "teacher_forced_steps": 16,
        "decode_speed_ratio": 0.9,
        "per_prompt": [{"prompt_tokens": 4, "exact_text": "a", "quantized_text": "b"}],
    }
    side = {"prefill_seconds_mean": 0.05, "decode_tokens_per_s": 100.0, "generated_tokens": 16}
    return make_record("real-model", config, metrics, {"exact": side, "quantized": side}, 2)


def _exact_record() -> dict:
    """A real-model exact-mode record: no cache configuration, exact KV memory only."""
    config = {
        "workload": "real-model",
        "bundle": "/bundles/tiny",
        "model": "tiny-llama",
        "mode": "exact",
        "prompts": 1,
        "max_new_tokens": 4,
        "top_k": 5,
        "threads": 2,
        "cache": None,
        "exact_layers": [],
    }
    metrics = {
        "exact_kv": {"kv_nbytes": 4096, "kv_float_nbytes": 4096, "kv_compression_ratio": 1.0},
        "per_prompt": [{"prompt_tokens": 4, "exact_text": "a"}],
    }
    timing = {"exact": {"prefill_seconds_mean": 0.04, "decode_tokens_per_s": 120.0, "generated_tokens": 4}}
    return make_record("real-model", config, metrics, timing, 2)


# The window set of the perplexity records with per-window values: 8 windows of 64 tokens, 32 of
# context and 32 scored.
WINDOWS, WINDOW, CONTEXT = 8, 64, 32
SCORED = WINDOW - CONTEXT
# Rows 1-7 of the 8 x 8 Hadamard matrix: mean-zero, mutually orthogonal window patterns. Two
# records whose per-window noise has different patterns are uncorrelated, window by window.
PATTERNS = hadamard(WINDOWS)[1:].astype(np.float64)
# The exact reference's per-window mean NLL, shared by every setting (windows differ in difficulty).
EXACT_NLL = 2.9 + 0.5 * PATTERNS[6]
TEXT_WINDOWS = [
    {"article": (3 * index) % 5, "title": f"Article {(3 * index) % 5}", "offset": 100 * index}
    for index in range(WINDOWS)
]


def _windowed(
    ratio: float, se: float, pattern: int, window_effect: np.ndarray | None
) -> tuple[dict, dict, dict]:
    """Per-window and per-token values of a perplexity record, and its window-level figures: per
    window, d = quantized - exact NLL is log(ratio), plus noise along window pattern ``pattern``
    sized so that the window-level SE of the ratio is ``se``, plus ``window_effect`` (a window's
    own difficulty for the quantized cache, shared by the settings given the same effect)."""
    noise = np.sqrt(WINDOWS - 1) * se / ratio * PATTERNS[pattern]
    d = np.log(ratio) + noise + (0.0 if window_effect is None else window_effect)
    quantized = EXACT_NLL + d
    per_window = {
        "exact_nll": EXACT_NLL.tolist(),
        "quantized_nll": quantized.tolist(),
        "kl": [0.1 * ratio] * WINDOWS,
        "top1_match": [1 / ratio] * WINDOWS,
        "delta_p": [-0.0125] * WINDOWS,
        "delta_p_sq": [0.0875**2] * WINDOWS,
        "tokens": [SCORED] * WINDOWS,
    }
    window_of = np.repeat(np.arange(WINDOWS), SCORED)
    per_token = {name: np.repeat(per_window[name], SCORED).tolist() for name in PER_TOKEN_FIELDS}
    per_token["window"] = window_of.tolist()
    mean, d_se = cluster_mean_se(np.repeat(d, SCORED), window_of)
    ratio = round(float(np.exp(mean)), 12)  # without float noise, so that 0.01 shows as "0.010"
    figures = {
        "exact_perplexity": float(np.exp(EXACT_NLL.mean())),
        "quantized_perplexity": float(np.exp(quantized.mean())),
        "perplexity_ratio": ratio,
        "perplexity_ratio_se": round(ratio * d_se, 12),
        "perplexity_ratio_se_token": 0.2 * se,
        "scored_tokens": WINDOWS * SCORED,
        "clusters": WINDOWS,
    }
    return per_window, per_token, figures


def _perplexity_record(
    bits: float,
    ratio: float,
    protocol: str = "decode",
    key_strategy: str = "mse",
    value_strategy: str = "mse",
    quantized_layers: list[int] | None = None,
    se: float | None = None,
    pattern: int = 0,
    window_effect: np.ndarray | None = None,
) -> dict:
    """A perplexity record with the fields tq.tasks.perplexity writes. Without ``se``, an older
    record (first windows of the text, no standard errors, no per-window values); with ``se``, a
    record of windows drawn from seed 0 (:data:`TEXT_WINDOWS`) with its per-window and per-token
    values (:func:`_windowed`), window-level SEs (ratio and top-1 ``se``, KL ``se / 10``) and
    per-token SEs beside them."""
    cache = CacheConfig(
        key_bits=bits, value_bits=bits, key_strategy=key_strategy, value_strategy=value_strategy
    )
    config = {
        "workload": "perplexity",
        "bundle": "/bundles/tiny",
        "model": "tiny-llama",
        "text": "Wikipedia excerpt",
        "windows": 2,
        "window": 64,
        "context": 32,
        "threads": 2,
        "cache": cache.describe(),
        "exact_layers": [],
        "quantized_layers": quantized_layers,
        "protocol": protocol,
    }
    metrics = {
        "exact_perplexity": 18.0,
        "quantized_perplexity": 18.0 * ratio,
        "perplexity_ratio": ratio,
        "kl_divergence": 0.1 * ratio,
        "top1_agreement": 1 / ratio,
        "scored_tokens": 64,
        "context_kv_nbytes": 1000,
        "context_kv_float_nbytes": 7000,
        "kv_compression_ratio": 7.0,
    }
    if se is None:
        metrics["window_perplexities"] = {"exact": [17.0, 19.0], "quantized": [17.5, 19.5]}
    else:
        per_window, per_token, figures = _windowed(ratio, se, pattern, window_effect)
        config |= {
            "text": "Wikipedia articles (tq.data.corpus), windows drawn across them",
            "sample_seed": 0,
            "windows": WINDOWS,
            "window": WINDOW,
            "context": CONTEXT,
            "text_windows": [dict(window) for window in TEXT_WINDOWS],
            "se_unit": "window",
        }
        metrics |= figures | {
            "kl_divergence_se": se / 10,
            "kl_divergence_median": 0.0625,
            "kl_divergence_p99": 0.875,
            "kl_divergence_max": 2.5,
            "top1_agreement_se": se,
            "delta_p_mean": -0.0125,
            "delta_p_mean_se": 0.0025,
            "delta_p_rms": 0.0875,
            "delta_p_rms_se": 0.005,
            "per_window": per_window,
            "per_token": per_token,
        }
    return make_record("real-model", config, metrics, {"seconds": 3.0}, 2)


@pytest.fixture(scope="module")
def synthetic_records():
    runs = [(32, bits, "mse") for bits in (1, 2)] + [(32, bits, "prod") for bits in (2, 3)]
    return [
        run_synthetic(dim=dim, bits=bits, strategy=strategy, n=256, quick=True)
        for dim, bits, strategy in runs
    ]


@pytest.fixture(scope="module")
def trace_records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("traces")
    records = []
    for layer in (0, 1):
        path = folder / f"layer{layer}.safetensors"
        _trace(layer).save(path)
        for config in (
            CacheConfig(key_bits=2, value_bits=2),
            CacheConfig(key_bits=4, value_bits=4),
            CacheConfig(key_bits=3, value_bits=3, key_strategy="prod"),
            CacheConfig(key_strategy="exact", value_strategy="exact"),
        ):
            records.append(run_trace(path, config))
    return records


def _needle_record(bits: float, quantized: float) -> dict:
    """A needle record with the fields tq.tasks.needle writes (exact retrieval 0.75)."""
    config = {
        "workload": "needle",
        "bundle": "/bundles/tiny",
        "model": "tiny-llama",
        "context_lengths": [1024, 2048],
        "depths": [0.5],
        "trials": 2,
        "cache": CacheConfig(key_bits=bits, value_bits=bits).describe(),
        "exact_layers": [],
    }
    side = {"trials": 2, "exact_retrieval": 0.75, "quantized_retrieval": quantized}
    metrics = {
        "exact_retrieval": 0.75,
        "quantized_retrieval": quantized,
        "retrieval_agreement": 0.5,
        "answer_agreement": 0.25,
        "by_length": {"1024": side, "2048": side},
        "cells": [],
        "kv_compression_ratio": 32 / bits,
    }
    return make_record("real-model", config, metrics, {"seconds": 1.0}, 2)


@pytest.fixture(scope="module")
def real_records():
    return [
        _compare_record(2, agreement=0.625),
        _compare_record(4, agreement=0.875),
        _compare_record(3, strategy="prod", agreement=0.5),
        _exact_record(),
        _perplexity_record(2, 1.375),
        _perplexity_record(4, 1.0625),
        _perplexity_record(4, 1.03125, protocol="window"),
        _perplexity_record(2, 1.5, key_strategy="kivi", value_strategy="kivi"),
        _perplexity_record(2, 1.125, value_strategy="exact"),
        _perplexity_record(2, 1.25, quantized_layers=[0]),
        _perplexity_record(2, 1.0, quantized_layers=[1]),
        _needle_record(2, 0.25),
        _needle_record(4, 0.5),
    ]


@pytest.fixture(scope="module")
def records(synthetic_records, trace_records, real_records):
    return [*synthetic_records, *trace_records, *real_records]


@pytest.fixture(scope="module")
def report(tmp_path_factory, records):
    """The report of every record, written once for the tests that read it."""
    return _write_report(records, tmp_path_factory.mktemp("report") / "report")


def _write_report(records: list[dict], out) -> Path:
    """The report of some records as the pipeline writes it: from summary.csv and per_window.csv."""
    return write_report(summary_table(records), out, per_window=per_window_table(records))


def _images(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def _section(markdown: str, heading: str) -> str:
    start = markdown.index(heading)
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end >= 0 else None]


# ------------------------------------------------------------------------------- loading


def test_load_records_reads_files_in_order(tmp_path, records):
    paths = []
    for index, record in enumerate(records):
        paths.append(tmp_path / f"{index:02d}.json")
        write_json(paths[-1], record)
    assert load_records(paths) == json.loads(json.dumps(records))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "a record is a JSON object"),
        (json.dumps({"schema": "tq.result/0", "source": "synthetic"}), "schema must be"),
        (json.dumps({"schema": "tq.result/1", "source": "magic"}), "source must be one of"),
        (
            json.dumps(
                {"schema": "tq.result/1", "source": "trace", "config": {}, "metrics": [], "timing": {}}
            ),
            "'metrics' must be a JSON object",
        ),
    ],
)
def test_bad_record_file_is_rejected_naming_it(tmp_path, records, content, message):
    good = tmp_path / "good.json"
    write_json(good, records[0])
    bad = tmp_path / "bad-record.json"
    bad.write_text(content)
    with pytest.raises(RecordError, match=message) as error:
        load_records([good, bad])
    assert str(bad) in str(error.value)


def test_missing_record_file_is_named(tmp_path):
    missing = tmp_path / "absent.json"
    with pytest.raises(RecordError, match="cannot read") as error:
        load_records([missing])
    assert str(missing) in str(error.value)


# --------------------------------------------------------------------------------- table


def test_summary_table_has_one_flat_row_per_record(records):
    table = summary_table(records)
    assert len(table) == len(records)
    assert list(table.columns[: len(COORDINATES)]) == list(COORDINATES)
    assert list(table.columns[-2:]) == ["tq_version", "created"]
    assert table.columns.is_unique
    # Lists (per_prompt, first_divergence_steps, window perplexities) and text are left out.
    for dropped in ("per_prompt", "first_divergence_steps", "window_perplexities.exact", "note", "text"):
        assert not any(column.startswith(dropped) for column in table.columns), dropped
    for nested in (
        "quantized_kv.kv_compression_ratio",
        "timing.seconds.quantize",
        "timing.exact.decode_tokens_per_s",
        "timing.quantize_vectors_per_s",
    ):
        assert nested in table.columns, nested
    assert table["workload"].value_counts().to_dict() == {
        "synthetic": 4,
        "trace": 8,
        "real-model": 4,
        "perplexity": 7,
        "needle": 2,
    }


def test_summary_table_values_come_from_the_records(records, synthetic_records, trace_records):
    table = summary_table(records)
    first = synthetic_records[1]
    row = table[(table["workload"] == "synthetic") & (table["bits"] == 2) & (table["strategy"] == "mse")]
    assert len(row) == 1
    assert row["d_mse"].item() == first["metrics"]["d_mse"]
    assert row["timing.seconds.quantize"].item() == first["timing"]["seconds"]["quantize"]
    assert np.isnan(table.loc[table["strategy"] == "prod", "d_mse_expected"]).all()

    compare = table[(table["mode"] == "compare") & (table["key_strategy"] == "prod")]
    assert compare["bits"].item() == 3 and compare["key_bits"].item() == 3
    assert compare["quantized_kv.kv_compression_ratio"].item() == 32 / 3
    assert compare["exact_layers"].item() == "0,3"
    exact = table[table["mode"] == "exact"]
    assert exact["exact_layers"].item() == "none"
    assert exact[["bits", "key_bits", "key_strategy"]].isna().all(axis=None)

    trace = table[(table["workload"] == "trace") & (table["layer"] == 1) & (table["key_strategy"] == "prod")]
    # The trace metric key_bits would collide with the cache's key_bits coordinate.
    assert trace["metrics.key_bits"].item() == trace_records[6]["metrics"]["key_bits"]
    assert trace["softmax_kl"].item() == trace_records[6]["metrics"]["softmax_kl"]
    assert trace["value_bits"].item() == 3 and trace["bits"].item() == 3
    both_exact = table[(table["workload"] == "trace") & (table["key_strategy"] == "exact")]
    assert both_exact["bits"].isna().all()
    assert table.loc[table["protocol"] == "window", "perplexity_ratio"].item() == 1.03125


def test_summary_table_does_not_depend_on_record_order(records):
    shuffled = list(records)
    random.Random(3).shuffle(shuffled)
    pd.testing.assert_frame_equal(summary_table(records), summary_table(shuffled))


def test_summary_table_rejects_a_bad_record(records):
    with pytest.raises(RecordError, match="record 1: source must be"):
        summary_table([records[0], {**records[0], "source": "magic"}])


def test_csv_round_trips(tmp_path, records):
    table = summary_table(records)
    path = tmp_path / "out" / "summary.csv"
    write_summary(table, path)
    assert [p.name for p in path.parent.iterdir()] == ["summary.csv"]  # no temporary file left
    pd.testing.assert_frame_equal(read_summary(path), table)


def test_empty_table_keeps_its_columns(tmp_path):
    table = summary_table([])
    assert table.empty and list(table.columns) == [*COORDINATES, "tq_version", "created"]
    write_summary(table, tmp_path / "empty.csv")
    pd.testing.assert_frame_equal(read_summary(tmp_path / "empty.csv"), table)


# -------------------------------------------------------------------------------- report


def test_report_has_every_section_and_valid_plots(report):
    path = report
    assert path.name == "report.md" and path.parent.name == "report"
    markdown = path.read_text()
    positions = [markdown.index(heading) for heading in SECTIONS]
    assert positions == sorted(positions)
    assert "omitted" not in markdown
    assert sorted(_images(markdown)) == sorted(PLOTS)
    for name in PLOTS:
        data = (path.parent / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, name
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([*PLOTS, "report.md"])


def _headings(markdown: str) -> list[str]:
    return [line.removeprefix("## ") for line in markdown.splitlines() if line.startswith("## ")]


# Whether a sweep runs each optional stage a registered figure is drawn from: here, all of them.
EVERY_STAGE = {figure.stage: True for section in REGISTRY for figure in section.figures if figure.stage}


def test_the_report_is_the_registered_sections_in_order(tmp_path, records):
    """Every section of the registry, and nothing else, under its heading in registry order; with
    every kind of record, each registered figure drawn and linked, and no other file written."""
    titles = [section.title for section in REGISTRY]
    assert len({section.name for section in REGISTRY}) == len(REGISTRY)
    key_stats = [_key_stats_record("tiny-llama", [0.5, 0.7])]
    path = write_report(
        summary_table(records),
        tmp_path / "full",
        per_window=per_window_table(records),
        key_stats=key_stats,
    )
    markdown = path.read_text()
    assert _headings(markdown) == titles
    figures = [f"{name}.png" for name in sweep_figures(["tiny-llama"], EVERY_STAGE)]
    assert sorted(_images(markdown)) == sorted(figures)
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([*figures, "report.md"])
    assert _headings(_write_report([], tmp_path / "empty.md").read_text()) == titles


def test_sweep_figures_follow_the_models_and_the_optional_stages():
    figures = sweep_figures(["a", "b"], dict.fromkeys(EVERY_STAGE, False))
    assert figures["perplexity-a"] == figures["perplexity-b"] == ("Across models", "perplexity_model")
    optional = {
        name
        for section in REGISTRY
        for figure in section.figures
        if figure.stage
        for name in figure.names(["a"])
    }
    assert optional and not optional & set(figures)
    assert set(sweep_figures(["a", "b"], EVERY_STAGE)) - set(figures) == optional
    with pytest.raises(ValueError, match="optional stages"):
        sweep_figures(["a"], {})


def test_every_registered_figure_has_its_caption_file():
    captions = {figure.caption for section in REGISTRY for figure in section.figures}
    files = {path.stem for path in (ROOT / "workflow" / "report").glob("*.rst")} - {"report"}
    assert captions == files


def test_the_workflow_lists_the_registered_figures(tmp_path):
    """The report rule's outputs in a dry run of the quick sweep (one model, tiny-llama, with every
    optional stage) are report.md and the figures of the registry."""
    pytest.importorskip("snakemake")
    result = snakemake(copy_workflow(tmp_path), "results/report.md", "--dry-run", "--configfile", QUICK)
    job = (result.stdout + result.stderr).split("rule report:\n", 1)[1]
    outputs = re.search(r"^\s+output: (.*)$", job, re.M).group(1).split(", ")
    figures = [f"results/{name}.png" for name in sweep_figures(["tiny-llama"], EVERY_STAGE)]
    assert outputs == ["results/report.md", *figures]


def test_report_tables_are_generated_from_the_records(report, synthetic_records):
    markdown = report.read_text()
    headline = _section(markdown, "## Headline")
    assert "1.375" in headline and "1.062" in headline and "1.031" in headline
    assert "perplexity (decode)" in headline and "perplexity (window, quantized context only)" in headline
    assert "compare (teacher-forced)" in headline and "0.625" in headline and "0.875" in headline
    distortion = _section(markdown, "## 1. Distortion")
    for record in synthetic_records:
        assert f"{record['metrics']['d_mse']:.4g}" in distortion
    trace = _section(markdown, "## 2a.")
    assert "| prod 3 |" in trace and "| exact |" in trace
    notes = _section(markdown, "## What these numbers mean")
    assert "ONNX Runtime" in notes and "`decode`" in notes and "`window`" in notes


def test_distortion_findings_are_computed_from_the_table(report, synthetic_records):
    distortion = _section(report.read_text(), "## 1. Distortion")
    assert "**What this shows.**" in distortion
    for strategy, measured, lower, upper, name in (
        ("mse", "d_mse", "d_mse_lower_bound", "d_mse_upper_bound", "D_mse of MSE"),
        ("prod", "ip_mse", "d_prod_lower_bound", "d_prod_upper_bound", "D_prod of Prod"),
    ):
        metrics = [r["metrics"] for r in synthetic_records if r["config"]["strategy"] == strategy]
        inside = sum(m[lower] <= m[measured] <= m[upper] for m in metrics)
        ratios = [m[measured] / m[lower] for m in metrics]
        line = next(line for line in distortion.splitlines() if line.startswith(f"- {name}"))
        assert f"within both bounds in {inside} of {len(metrics)} settings" in line
        assert f"= {min(ratios):.2f} to {max(ratios):.2f}" in line


def test_new_sections_are_computed_from_the_records(report):
    markdown = report.read_text()
    layers = _section(markdown, "## 5. Per-layer sensitivity")
    assert "ratios 1.000 to 1.250" in layers
    # Records without standard errors: no claim either way.
    assert "no layer's ratio is shown to differ from 1.0 (exact): not tested" in layers
    baselines = _section(markdown, "## 6. Compared to what")
    assert (
        "TurboQuant MSE (4.57 stored bits) 1.375 ≈ KIVI-style (4.57 stored bits) 1.5 (≈: not tested"
        in baselines
    )
    ablations = _section(markdown, "## 7. Ablations")
    assert "only keys quantized" in ablations and "perplexity ratio 1.125 at" in ablations
    assert "vs 1.375 with the whole cache quantized (4.57 stored bits): not tested" in ablations
    needle = _section(markdown, "## 8. Needle")
    # Binomial SE over the 4 trials of a record: sqrt(0.5 * 0.5 / 4) and sqrt(0.75 * 0.25 / 4).
    assert "4 bits: retrieved 50 ± 25% of the needles vs 75 ± 22% with the exact cache" in needle
    assert "| 0.50 ± 0.25 |" in needle and "| 0.50 ± 0.35 |" in needle  # 4 trials; 2 at one length
    # The per-layer runs stay out of the perplexity section and the headline.
    assert "1.25" not in _section(markdown, "## 3. Perplexity")


def test_report_is_deterministic(tmp_path, records, report):
    again = _write_report(records, tmp_path)
    for name in [*PLOTS, "report.md"]:
        assert (again.parent / name).read_bytes() == (report.parent / name).read_bytes(), name


def test_empty_record_set_still_gives_a_report(tmp_path):
    path = _write_report([], tmp_path / "custom.md")
    assert path == tmp_path / "custom.md"
    markdown = path.read_text()
    assert "Generated from 0 result records." in markdown
    assert all(heading in markdown for heading in SECTIONS)
    # headline, 1, 2a, 2b, across models, 3, two throughput parts, 5, 6, 7 and 8
    assert markdown.count("omitted") == 12
    assert _images(markdown) == []
    assert "No perplexity records, so no perplexity protocol was used." in markdown
    assert [p.name for p in tmp_path.iterdir()] == ["custom.md"]


def test_partial_record_set_reports_what_it_has(tmp_path, trace_records, real_records):
    table = summary_table([*trace_records, real_records[6]])  # one window-protocol perplexity
    markdown = write_report(_through_csv(table, tmp_path), tmp_path).read_text()
    assert sorted(_images(markdown)) == ["perplexity-tiny-llama.png", "quality_trace.png"]
    assert "No synthetic records: section omitted." in markdown
    assert "No real-model compare records: section omitted." in markdown
    assert "`window`" in markdown and "`decode`" not in markdown


def _through_csv(table: pd.DataFrame, folder) -> pd.DataFrame:
    """The table as the report rule sees it: written by aggregate, read back from CSV."""
    write_summary(table, folder / "summary.csv")
    return read_summary(folder / "summary.csv")


def test_markdown_table_formats_cells():
    table = pd.DataFrame({"a": [1.0, np.nan, 123456.789], "b": ["x|y", None, "z"]})
    assert markdown_table(table, {"a": "A", "b": "B"}).splitlines() == [
        "| A | B |",
        "|---|---|",
        "| 1 | x\\|y |",
        "| - | - |",
        "| 1.235e+05 | z |",
    ]


# ------------------------------------------------------------------------- uncertainty


def test_plus_minus_shows_the_value_to_the_precision_of_its_error():
    assert plus_minus(1.19432, 0.0123) == "1.194 ± 0.012"
    assert plus_minus(0.05512, 0.0021) == "0.0551 ± 0.0021"
    assert plus_minus(2.7, 0.5) == "2.70 ± 0.50"
    assert plus_minus(0.5, 0.25, percent=True) == "50 ± 25%"
    assert plus_minus(1.0, 0.0) == "1 ± 0"
    assert plus_minus(1.375, np.nan) == "1.375"  # an old record: the value alone
    assert plus_minus(np.nan, 0.01) == "-"


def test_paired_test_is_the_95_percent_interval_of_the_mean_window_difference():
    assert Z95 == 1.96
    paired = Paired(np.array([0.1, 0.3, 0.2]), np.array([10, 30, 20]))  # per-window means, tokens
    mean = (0.1 * 10 + 0.3 * 30 + 0.2 * 20) / 60  # the mean over tokens
    sums = np.array([10, 30, 20]) * (np.array([0.1, 0.3, 0.2]) - mean)  # cluster-robust, G = 3
    assert paired.windows == 3 and paired.mean == pytest.approx(mean)
    assert paired.se == pytest.approx(np.sqrt(3 / 2 * np.sum(sums**2)) / 60)
    assert paired.different  # 0.233 > 1.96 * 0.051
    assert not Paired(np.array([0.1, -0.05, 0.02]), np.array([10, 30, 20])).different
    assert not Paired(np.array([0.5]), np.array([10])).different  # one window: no SE, no claim
    # Two settings on the same windows: the difference of their quantized NLLs, window by window.
    a = pd.DataFrame(
        {
            "article": [4, 1, 7],
            "offset": [0, 10, 20],
            "tokens": [10, 30, 20],
            "exact_nll": [2.0, 3.0, 4.0],
            "quantized_nll": [2.1, 3.3, 4.2],
        }
    )
    b = a.assign(quantized_nll=[2.05, 3.35, 4.1])
    assert paired_nll(a, b).mean == pytest.approx((0.05 * 10 - 0.05 * 30 + 0.1 * 20) / 60)
    assert paired_nll(a, b.assign(offset=[0, 10, 30])) is None  # not the same windows
    assert paired_nll(a, None) is None and paired_nll(None, b) is None


def test_the_test_against_exact_is_the_records_window_level_error():
    record = _perplexity_record(3, 1.2, se=0.03, pattern=2)
    per_window, metrics = record["metrics"]["per_window"], record["metrics"]
    d = np.subtract(per_window["quantized_nll"], per_window["exact_nll"])
    paired = Paired(d, np.asarray(per_window["tokens"]))  # the record's own per-window difference
    assert metrics["perplexity_ratio"] == pytest.approx(1.2) and metrics["perplexity_ratio_se"] == 0.03
    assert np.exp(paired.mean) == pytest.approx(metrics["perplexity_ratio"])
    assert paired.se * metrics["perplexity_ratio"] == pytest.approx(metrics["perplexity_ratio_se"])
    row = summary_table([record]).iloc[0]
    assert against_exact(row) is paired.different is True
    # 1.05 ± 0.03: log(1.05) = 0.049 < 1.96 * 0.03 / 1.05 = 0.056
    assert against_exact(row.copy().replace({1.2: 1.05})) is False
    assert against_exact(row.drop("perplexity_ratio_se")) is None


def test_compare_mode_is_tested_against_exact_over_prompts(tmp_path):
    records = [_compare_record(2), _compare_record(4)]
    for record, ratio in zip(records, (1.5, 1.02), strict=True):
        record["metrics"] |= {"perplexity_ratio": ratio, "perplexity_ratio_se": 0.1, "scored_tokens": 16}
        record["config"]["se_unit"] = "prompt"
    headline = _section(_write_report(records, tmp_path / "a.md").read_text(), "## Headline")
    assert (
        "compare (teacher-forced): 1 of 2 settings have a perplexity ratio not distinguishable from 1.0 "
        "(exact) on 2 prompts: K mse 4 / V mse 4, layers 0,3 exact (1.02 ± 0.10)."
    ) in headline
    del records[0]["config"]["se_unit"]  # an older record: its per-token SE is not shown
    headline = _section(_write_report(records, tmp_path / "b.md").read_text(), "## Headline")
    assert "| 1.5 |" in headline and "1 of 1 settings" in headline


def _ranked(*estimates: tuple[float, float, float], old: bool = False) -> str:
    """The ranking of perplexity records given as (bits, ratio, SE), each with its own window
    pattern (uncorrelated between records), named by their bits; ``old``: records without
    per-window values instead."""
    records = [
        _perplexity_record(bits, ratio, se=None if old else se, pattern=index)
        for index, (bits, ratio, se) in enumerate(estimates)
    ]
    rows = summary_table(records)
    return ranking(rows, lambda row: f"b{int(row['key_bits'])}", WindowValues(per_window_table(records)))


def test_ranking_orders_only_what_the_paired_tests_separate():
    assert _ranked((2, 1.30, 0.02), (3, 1.06, 0.01), (4, 1.05, 0.01)) == (
        "b4 1.050 ± 0.010 ≈ b3 1.060 ± 0.010 < b2 1.300 ± 0.020 (≈: not distinguishable on 8 windows)"
    )
    assert _ranked((2, 1.1, 0.001), (3, 1.0, 0.001)) == "b3 1.0000 ± 0.0010 < b2 1.1000 ± 0.0010"
    # 2 and 4 differ, but 3 is within noise of both: no "<" anywhere.
    assert "<" not in _ranked((2, 1.00, 0.01), (3, 1.02, 0.01), (4, 1.04, 0.01))
    # A wide interval before a "<" must be separated from everything after it too.
    assert _ranked((2, 1.00, 0.2), (3, 1.01, 0.001), (4, 1.10, 0.001)).count("≈") == 3  # 2 joins, note
    # Records without per-window values are not tested, however far apart.
    assert _ranked((2, 1.1, 0.001), (3, 1.0, 0.001), old=True) == (
        "b3 1 ≈ b2 1.1 (≈: not tested, no per-window values recorded)"
    )


def test_paired_test_sees_through_a_shared_window_effect(tmp_path):
    """Two settings whose per-window differences move together (a window hard for one is hard
    for the other): their own intervals overlap, but the paired difference is consistent, so
    they differ. With the same spread not shared, they do not."""
    effect = 0.08 * PATTERNS[2]  # a large window effect: SE of the ratio about 0.034
    lower = _perplexity_record(4, 1.10, se=0.004, pattern=0, window_effect=effect)
    shared = _perplexity_record(3, 1.12, se=0.004, pattern=1, window_effect=effect)
    apart = _perplexity_record(3, 1.12, se=0.004, pattern=1, window_effect=0.08 * PATTERNS[3])
    for other in (shared, apart):
        a, b = lower["metrics"], other["metrics"]
        # The individual 95% intervals overlap.
        gap = b["perplexity_ratio"] - a["perplexity_ratio"]
        assert 0 < gap < Z95 * (a["perplexity_ratio_se"] + b["perplexity_ratio_se"])
    findings = _section(_write_report([lower, shared], tmp_path / "shared.md").read_text(), "## 3.")
    assert "K mse 4 / V mse 4 1.100 ± 0.034 < K mse 3 / V mse 3 1.120 ± 0.034." in findings
    findings = _section(_write_report([lower, apart], tmp_path / "apart.md").read_text(), "## 3.")
    assert (
        "K mse 4 / V mse 4 1.100 ± 0.034 ≈ K mse 3 / V mse 3 1.120 ± 0.034 (≈: not distinguishable "
        "on 8 windows)."
    ) in findings


def test_mean_of_records_combines_their_standard_errors():
    table = pd.DataFrame(
        {
            "setting": ["a", "a", "b", "b"],
            "trace": ["t0", "t1", "t0", "t1"],
            "kl_divergence": [0.1, 0.2, 0.3, 0.4],
            "kl_divergence_se": [0.03, 0.04, 0.01, np.nan],
        }
    )
    means = mean_by(table, ["setting"], ["kl_divergence", "top1_agreement"], over=["trace"])
    means = means.set_index("setting")
    assert means.loc["a", "kl_divergence"] == pytest.approx(0.15)
    assert means.loc["a", "kl_divergence_se"] == pytest.approx(0.025)  # sqrt(0.03² + 0.04²) / 2
    assert np.isnan(means.loc["b", "kl_divergence_se"])  # one record without an SE
    assert "top1_agreement_se" not in means


def test_a_row_never_pools_two_records_of_one_setting():
    table = pd.DataFrame(
        {
            "model": ["m", "m"],
            "key_strategy": ["kivi", "kivi"],
            "group_size": [16.0, 32.0],
            "trace": ["t0", "t0"],
            "kl_divergence": [0.1, 0.2],
        }
    )
    with pytest.raises(ReportError, match="differ only in group_size, which the row does not show"):
        mean_by(table, ["model", "key_strategy"], ["kl_divergence"], over=["trace"])
    with pytest.raises(ReportError, match="the same setting measured twice"):
        mean_by(table.assign(group_size=16.0), ["model", "key_strategy"], ["kl_divergence"])
    rows = mean_by(table, ["model", "key_strategy", "group_size"], ["kl_divergence"])
    assert list(rows["records"]) == [1, 1]


def test_plots_draw_95_percent_error_bars_where_there_are_errors():
    table = pd.DataFrame(
        {
            "line": ["x", "x", "y", "y"],
            "bits": [2.0, 4.0, 2.0, 4.0],
            "perplexity_ratio": [1.3, 1.05, 1.4, 1.1],
            "perplexity_ratio_se": [0.02, 0.01, 0.02, np.nan],
        }
    )
    _, axes = new_figure(2)
    assert plot_lines(axes[0], table, ["line"], "perplexity_ratio", lambda row: row["line"])
    bars = [container for container in axes[0].containers if hasattr(container, "has_yerr")]
    assert len(bars) == 2 and all(container.has_yerr for container in bars)
    segments = bars[0].lines[2][0].get_segments()  # line x: the bar at 2 bits spans ± 1.96 SE
    assert segments[0][:, 1] == pytest.approx([1.3 - 1.96 * 0.02, 1.3 + 1.96 * 0.02])
    finish_axis(axes[0], "ratio", "ratio", table["bits"], bars=True)
    assert BARS_NOTE in axes[0].get_title() and "95%" in BARS_NOTE
    without = table.drop(columns="perplexity_ratio_se")
    assert not plot_lines(axes[1], without, ["line"], "perplexity_ratio", lambda row: row["line"])
    assert not axes[1].containers


@pytest.fixture(scope="module")
def uncertain_report(tmp_path_factory):
    """A report of records with window-level standard errors and per-window values, each
    setting's window noise uncorrelated with the others': MSE and KIVI-style at 4 bits within
    noise of each other, 2-bit MSE well above both, a keys-only ablation within noise of 2-bit MSE,
    a window-protocol run, one layer whose ratio stands out and one that does not."""
    records = [
        _perplexity_record(4, 1.05, se=0.01, pattern=0),
        _perplexity_record(4, 1.06, key_strategy="kivi", value_strategy="kivi", se=0.01, pattern=1),
        _perplexity_record(2, 1.30, se=0.02, pattern=2),
        _perplexity_record(2, 1.29, value_strategy="exact", se=0.02, pattern=3),
        _perplexity_record(4, 1.01, protocol="window", se=0.01, pattern=4),
        _perplexity_record(2, 1.25, quantized_layers=[0], se=0.01, pattern=5),
        _perplexity_record(2, 1.01, quantized_layers=[1], se=0.01, pattern=6),
    ]
    path = tmp_path_factory.mktemp("uncertain") / "report.md"
    return _write_report(records, path).read_text()


def test_tables_show_value_plus_minus_standard_error(uncertain_report):
    perplexity = _section(uncertain_report, "## 3. Perplexity")
    for header in ("KL median", "KL p99", "KL max", "Δp mean", "Δp RMS"):
        assert f"| {header} |" in perplexity, header
    row = next(line for line in perplexity.splitlines() if "| kivi 4 g32 |" in line)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    # ratio, KL, KL median, p99, max, top-1, delta-p mean, delta-p RMS
    assert cells[8:16] == [
        "1.060 ± 0.010",
        "0.1060 ± 0.0010",
        "0.0625",
        "0.875",
        "2.5",
        "0.943 ± 0.010",
        "-0.0125 ± 0.0025",
        "0.0875 ± 0.0050",
    ]
    headline = _section(uncertain_report, "## Headline")
    assert "| 1.300 ± 0.020 |" in headline and "| 0.943 ± 0.010 |" in headline
    assert "| 0.1060 ± 0.0010 |" in headline
    assert "| 1.250 ± 0.010 |" in _section(uncertain_report, "## 5. Per-layer")
    assert "| 1.290 ± 0.020 |" in _section(uncertain_report, "## 7. Ablations")


def test_findings_call_settings_different_only_beyond_their_intervals(uncertain_report):
    perplexity = _section(uncertain_report, "## 3. Perplexity")
    assert (
        "- tiny-llama, decode: perplexity ratio (best first): K mse 4 / V mse 4 1.050 ± 0.010 ≈ "
        "K kivi 4 g32 / V kivi 4 g32 1.060 ± 0.010 < K mse 2 / V exact 1.290 ± 0.020 ≈ "
        "K mse 2 / V mse 2 1.300 ± 0.020 (≈: not distinguishable on 8 windows)."
    ) in perplexity
    baselines = _section(uncertain_report, "## 6. Compared to what")
    assert (
        "TurboQuant MSE (4.57 stored bits) 1.050 ± 0.010 ≈ KIVI-style (4.57 stored bits) 1.060 ± 0.010 "
        "(≈: not distinguishable on 8 windows)"
    ) in baselines
    ablations = _section(uncertain_report, "## 7. Ablations")
    assert (
        "perplexity ratio 1.290 ± 0.020 at 4.57 stored bits vs 1.300 ± 0.020 with the whole cache "
        "quantized (4.57 stored bits): not distinguishable on 8 windows."
    ) in ablations
    headline = _section(uncertain_report, "## Headline")
    assert "perplexity (decode): 0 of 4 settings have a perplexity ratio not distinguishable" in headline
    assert (
        "perplexity (window, quantized context only): 1 of 1 settings have a perplexity ratio not "
        "distinguishable from 1.0 (exact) on 8 windows: K mse 4 / V mse 4 (1.010 ± 0.010)."
    ) in headline
    assert "within 0.0" not in uncertain_report


def test_layer_sensitivity_names_the_layers_beyond_noise(uncertain_report, tmp_path):
    layers = _section(uncertain_report, "## 5. Per-layer sensitivity")
    assert (
        "1 of 2 layers differ from exact beyond the 95% interval of their per-window quantized - exact "
        "NLL difference on 8 windows: layer 0 (1.250 ± 0.010, KL 0.1250 ± 0.0010)."
    ) in layers
    assert "layer 1 (" not in layers
    quiet = [
        _perplexity_record(2, 1.01, quantized_layers=[0], se=0.01, pattern=0),
        _perplexity_record(2, 0.995, quantized_layers=[1], se=0.01, pattern=1),
    ]
    markdown = _write_report(quiet, tmp_path).read_text()
    layers = _section(markdown, "## 5. Per-layer sensitivity")
    assert "no layer's ratio is shown to differ from 1.0 (exact): not distinguishable on 8 windows" in layers


def test_window_protocol_is_labelled_and_decode_leads(uncertain_report):
    perplexity = _section(uncertain_report, "## 3. Perplexity")
    table_rows = [line for line in perplexity.splitlines() if line.startswith("| tiny-llama")]
    protocols = [line.split("|")[2].strip() for line in table_rows]
    assert protocols == ["decode"] * 4 + ["window, quantized context only"]
    assert perplexity.index("- tiny-llama, decode:") < perplexity.index("- tiny-llama, window, quantized")
    headline = _section(uncertain_report, "## Headline")
    assert headline.index("perplexity (decode)") < headline.index("perplexity (window, quantized context")
    notes = _section(uncertain_report, "## What these numbers mean")
    assert notes.index("`decode`") < notes.index("`window` (quantized context only)")


def test_old_records_without_errors_show_values_alone(report):
    markdown = report.read_text()
    perplexity = _section(markdown, "## 3. Perplexity")
    row = next(line for line in perplexity.splitlines() if "| kivi 2 g32 |" in line)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert "±" not in row and cells[8] == "1.5" and cells.count("-") == 5  # the newer statistics
    headline = _section(markdown, "## Headline").splitlines()
    headline_rows = [line for line in headline if line.startswith("| tiny")]
    assert headline_rows and not any("±" in line for line in headline_rows)
    assert "not tested, no per-window values recorded" in perplexity


def test_compare_records_that_scored_enough_are_not_flagged():
    rows = pd.DataFrame(
        {
            "model": ["a", "b"],
            "prompts": [3.0, 3.0],
            "max_new_tokens": [4.0, 4.0],
            "scored_tokens": [12.0, 5.0],
        }
    )
    assert few_scored_tokens(rows.iloc[:1]) == []
    (flag, _) = few_scored_tokens(rows)
    assert "1 of 2 compare records" in flag and "b (5 of 12 tokens)" in flag


def test_a_baseline_at_two_group_sizes_gives_two_rows(tmp_path):
    records = [_perplexity_record(2, 1.5, key_strategy="kivi", value_strategy="kivi") for _ in range(2)]
    records[1]["config"]["cache"]["group_size"] = 16
    section = _section(_write_report(records, tmp_path / "report.md").read_text(), "## 3.")
    assert "| kivi 2 g32 | kivi 2 g32 |" in section and "| kivi 2 g16 | kivi 2 g16 |" in section
    with pytest.raises(ReportError, match="the same setting measured twice"):
        _write_report([records[0], records[0]], tmp_path / "twice.md")


# --------------------------------------------------------------- windows: the unit of the ±


def test_report_states_the_text_the_windows_and_what_plus_minus_means(uncertain_report, report):
    sentence = (
        "Wikipedia articles (tq.data.corpus), windows drawn across them: 8 windows of 64 tokens (32 of "
        "context, 32 scored) drawn from seed 0 across 5 distinct articles. ± is one standard error "
        "with the window as the unit, over 8 windows; the per-token SE, which treats tokens as "
        "independent, is `<name>_se_token` in summary.csv."
    )
    perplexity = _section(uncertain_report, "## 3. Perplexity")
    assert sentence in perplexity
    assert perplexity.index(sentence) < perplexity.index("| model |")  # near the top
    assert sentence in _section(uncertain_report, "## What these numbers mean")
    assert "drawn from seed 0 across 5 distinct articles" in _section(uncertain_report, "## 5. Per-layer")
    compare = _section(report.read_text(), "## 2b.")
    assert "one standard error with the prompt as the unit" in compare and "scored tokens, as" not in compare


def test_per_token_errors_of_older_records_are_not_shown(tmp_path):
    record = _perplexity_record(4, 1.06, se=0.01)
    for name in ("se_unit", "text_windows"):
        del record["config"][name]
    del record["metrics"]["per_window"]
    perplexity = _section(_write_report([record], tmp_path).read_text(), "## 3. Perplexity")
    row = next(line for line in perplexity.splitlines() if line.startswith("| tiny-llama"))
    assert "| 1.06 |" in row and "±" not in row
    assert "1 record without window-level standard errors (older runs) shows values alone" in perplexity


def _windowed_records() -> list[dict]:
    return [
        _perplexity_record(4, 1.05, se=0.01, pattern=0),
        _perplexity_record(2, 1.30, se=0.02, pattern=1, key_strategy="kivi", value_strategy="kivi"),
        _perplexity_record(2, 1.25, quantized_layers=[0], se=0.01, pattern=2),
        _perplexity_record(3, 1.2),  # older: no per-window values, no rows
        _compare_record(2),
    ]


def test_per_window_table_has_a_row_per_record_and_window(tmp_path):
    records = _windowed_records()
    table = per_window_table(records)
    assert list(table.columns[: len(WINDOW_SETTINGS)]) == list(WINDOW_SETTINGS)
    assert {"window_index", "article", "title", "offset", "quantized_nll", "tokens"} <= set(table.columns)
    assert len(table) == 3 * WINDOWS
    assert (
        table.groupby(["key_strategy", "key_bits", "quantized_layers"], dropna=False).size().tolist()
        == [WINDOWS] * 3
    )
    summary = summary_table(records)
    for record in records[:3]:
        layers = record["config"]["quantized_layers"]
        rows = table[
            (table["key_bits"] == record["config"]["cache"]["key_bits"])
            & (table["key_strategy"] == record["config"]["cache"]["key_strategy"])
            & (table["quantized_layers"].isna() if layers is None else table["quantized_layers"] == "0")
        ]
        assert rows["window_index"].tolist() == list(range(WINDOWS))
        assert rows[["article", "title", "offset"]].to_dict("records") == TEXT_WINDOWS
        for name in ("exact_nll", "quantized_nll", "tokens"):
            assert rows[name].tolist() == pytest.approx(record["metrics"]["per_window"][name])
        # The setting columns are those of the record's row in summary.csv.
        row = summary[
            (summary["workload"] == "perplexity")
            & (summary["key_bits"] == rows["key_bits"].iloc[0])
            & (summary["key_strategy"] == rows["key_strategy"].iloc[0])
            & summary["quantized_layers"].eq(rows["quantized_layers"].iloc[0]).fillna(layers is None)
        ]
        for name in WINDOW_SETTINGS[:-1]:  # all but the text, which summary.csv does not carry
            assert rows[name].nunique(dropna=False) == 1
            value, expected = rows[name].iloc[0], row[name].item()
            assert (pd.isna(value) and pd.isna(expected)) or value == expected, name
        assert rows["sample_seed"].iloc[0] == 0 and rows["windows"].iloc[0] == WINDOWS
    write_per_window(table, tmp_path / "per_window.csv")
    assert [p.name for p in tmp_path.iterdir()] == ["per_window.csv"]  # no temporary file left
    pd.testing.assert_frame_equal(read_per_window(tmp_path / "per_window.csv"), table)
    empty = per_window_table([_compare_record(2)])
    write_per_window(empty, tmp_path / "empty.csv")
    pd.testing.assert_frame_equal(read_per_window(tmp_path / "empty.csv"), empty)


def test_per_token_file_round_trips_and_agrees_with_the_windows(tmp_path):
    records = _windowed_records()
    table = per_token_table(records)
    assert len(table) == 3 * WINDOWS * SCORED
    assert list(table.columns[: len(WINDOW_SETTINGS)]) == list(WINDOW_SETTINGS)
    assert table.groupby(["key_bits", "quantized_layers", "window_index"], dropna=False)["position"].agg(
        list
    ).tolist() == [list(range(SCORED))] * (3 * WINDOWS)
    path = tmp_path / "per_token.parquet"
    write_per_token(table, path)
    assert [p.name for p in tmp_path.iterdir()] == ["per_token.parquet"]
    pd.testing.assert_frame_equal(read_per_token(path), table)
    keys = [*WINDOW_SETTINGS, "window_index"]
    means = table.groupby(keys, dropna=False)[["exact_nll", "quantized_nll"]].mean().reset_index()
    windows = per_window_table(records)
    merged = windows.merge(means, on=keys, suffixes=("", "_tokens"))
    assert len(merged) == len(windows)
    assert merged["quantized_nll_tokens"].to_numpy() == pytest.approx(merged["quantized_nll"].to_numpy())
    write_per_token(per_token_table([]), tmp_path / "empty.parquet")
    assert read_per_token(tmp_path / "empty.parquet").empty


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda r: r["metrics"]["per_window"]["kl"].pop(), "per_window lists differ in length: .*kl 7"),
        (lambda r: r["config"].update(windows=9), "per_window has 8 windows, config.windows is 9"),
        (lambda r: r["config"]["text_windows"].pop(), "text_windows must describe the 8 windows"),
        (lambda r: r["metrics"]["per_token"]["window"].pop(), "per_token lists differ in length"),
        (lambda r: r["metrics"]["per_window"]["tokens"].__setitem__(0, 31), "does not give each window"),
    ],
)
def test_a_record_with_inconsistent_per_window_values_is_refused(tmp_path, spoil, message):
    record = _perplexity_record(4, 1.05, se=0.01)
    write_json(tmp_path / "good.json", record)
    assert load_records([tmp_path / "good.json"]) == [record]
    spoil(record)
    path = tmp_path / "spoiled.json"
    write_json(path, record)
    with pytest.raises(RecordError, match=f"{re.escape(str(path))}: not a result record: .*{message}"):
        load_records([path])
    with pytest.raises(RecordError, match=f"record 0: .*{message}"):
        per_window_table([record])


# ------------------------------------------------------------------------- across models


def _model_record(model: str, setting: str, bits: float, ratio: float, se: float, **cache: object) -> dict:
    """A windowed perplexity record of ``model`` named ``setting`` by the sweep, with extra cache
    fields (``center_keys`` ...) and a KV compression of 32 / (bits + 1)."""
    record = _perplexity_record(bits, ratio, se=se, pattern=0)
    record["config"]["model"] = model
    record["config"]["cache"] |= cache
    record["metrics"]["kv_compression_ratio"] = 32 / (bits + 1)
    record["setting"] = setting
    return record


def _key_stats_record(model: str, shares: list[float]) -> dict:
    layer = lambda index, share: {  # noqa: E731
        "layer": index,
        "key": {"mean_energy_share": share, "channel_rms_ratio": 10.0 + index, "mean_norm": 20.0},
        "value": {"mean_energy_share": 0.1, "channel_rms_ratio": 2.0, "mean_norm": 5.0},
    }
    return {
        "model": model,
        "windows": 4,
        "window": 512,
        "layers": [layer(i, s) for i, s in enumerate(shares)],
    }


@pytest.fixture(scope="module")
def across_report(tmp_path_factory) -> Path:
    records = [
        _model_record("small", "k4mse-v4mse", 4, 1.01, 0.02),
        _model_record("small", "k4mse-v4mse-kc", 4, 1.01, 0.02, center_keys=True),
        _model_record("small", "k3mse-v3mse", 3, 1.2, 0.02),
        _model_record("biased", "k4mse-v4mse", 4, 5.8, 0.3),
        _model_record("biased", "k4mse-v4mse-kc", 4, 1.02, 0.02, center_keys=True),
        _model_record("biased", "k3mse-v3mse", 3, 14.8, 1.1),
    ]
    key_stats = [_key_stats_record("small", [0.5, 0.7]), _key_stats_record("biased", [0.99, 0.6])]
    out = tmp_path_factory.mktemp("across") / "report"
    return write_report(
        summary_table(records), out, per_window=per_window_table(records), key_stats=key_stats
    )


def test_the_cross_model_table_has_a_column_group_per_model(across_report):
    section = _section(across_report.read_text(), "## Across models")
    assert (
        "| setting | biased ratio | biased KL | biased bits | small ratio | small KL | small bits |"
        in section
    )
    row = next(line for line in section.splitlines() if line.startswith("| k4mse-v4mse-kc |"))
    assert "1.010 ± 0.020" in row and "1.020 ± 0.020" in row and row.count("5.00") == 2
    for name in ("perplexity-small.png", "perplexity-biased.png", "key_statistics.png"):
        assert (across_report.parent / name).read_bytes().startswith(PNG_SIGNATURE)


def test_the_cross_model_findings_follow_the_intervals(across_report):
    section = _section(across_report.read_text(), "## Across models")
    assert "- Not distinguishable from the exact cache on every model: k4mse-v4mse-kc." in section
    assert "- Not distinguishable from exact on small only: k4mse-v4mse." in section
    assert "- Worse than the exact cache on every model: k3mse-v3mse." in section
    assert (
        "- biased: centring the keys of k4mse-v4mse: ratio 5.80 ± 0.30 -> 1.020 ± 0.020, lower by its paired"
        in section
    )
    assert (
        "- small: centring the keys of k4mse-v4mse: ratio 1.010 ± 0.020 -> 1.010 ± 0.020, not distinguishable"
        in section
    )
    # the key statistics name the offset-dominated layer of one model and none of the other
    assert "| biased | 2 | 0.795 | 0.990 (0) | 0 (0.990) |" in section
    assert "| small | 2 | 0.600 | 0.700 (1) | none |" in section
