"""The report: records in, one flat table, a CSV that round-trips, markdown with valid PNG plots."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pandas as pd
import pytest

from tq.bench.synthetic import run_synthetic
from tq.bench.trace import run_trace
from tq.fileio import write_json
from tq.kvcache import CacheConfig
from tq.records import make_record
from tq.report import (
    BARS_NOTE,
    COORDINATES,
    Z95,
    RecordError,
    ReportError,
    _distinguishable,
    _few_scored_tokens,
    _figure,
    _finish,
    _mean_by,
    _plot_lines,
    _pm,
    _ranking,
    load_records,
    markdown_table,
    read_summary,
    summary_table,
    write_report,
    write_summary,
)
from tq.trace import KvTrace

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SECTIONS = (
    "## Headline",
    "## 1. Distortion vs bits",
    "## 2a. Attention quality vs bits",
    "## 2b. Next-token quality vs bits",
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
    "perplexity_vs_bits.png",
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
    """A real-model compare record with the fields tq.bench.real_model writes."""
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


def _perplexity_record(
    bits: float,
    ratio: float,
    protocol: str = "decode",
    key_strategy: str = "mse",
    value_strategy: str = "mse",
    quantized_layers: list[int] | None = None,
    se: float | None = None,
) -> dict:
    """A perplexity record with the fields tq.bench.perplexity writes; with ``se`` also the
    uncertainty fields of newer records (ratio and top-1 SE ``se``, KL SE ``se / 10``)."""
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
        "window_perplexities": {"exact": [17.0, 19.0], "quantized": [17.5, 19.5]},
    }
    if se is not None:
        metrics |= {
            "perplexity_ratio_se": se,
            "kl_divergence_se": se / 10,
            "kl_divergence_median": 0.0625,
            "kl_divergence_p99": 0.875,
            "kl_divergence_max": 2.5,
            "top1_agreement_se": se,
            "delta_p_mean": -0.0125,
            "delta_p_mean_se": 0.0025,
            "delta_p_rms": 0.0875,
            "delta_p_rms_se": 0.005,
            "per_token": {"exact_nll": [2.9] * 4, "kl": [0.1] * 4},
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
    """A needle record with the fields tq.bench.needle writes (exact retrieval 0.75)."""
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
    return write_report(summary_table(records), tmp_path_factory.mktemp("report") / "report")


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
    again = write_report(summary_table(records), tmp_path)
    for name in [*PLOTS, "report.md"]:
        assert (again.parent / name).read_bytes() == (report.parent / name).read_bytes(), name


def test_empty_record_set_still_gives_a_report(tmp_path):
    path = write_report(summary_table([]), tmp_path / "custom.md")
    assert path == tmp_path / "custom.md"
    markdown = path.read_text()
    assert "Generated from 0 result records." in markdown
    assert all(heading in markdown for heading in SECTIONS)
    # headline, 1, 2a, 2b, 3, two throughput parts, 5, 6, 7 and 8
    assert markdown.count("omitted") == 11
    assert _images(markdown) == []
    assert "No perplexity records, so no perplexity protocol was used." in markdown
    assert [p.name for p in tmp_path.iterdir()] == ["custom.md"]


def test_partial_record_set_reports_what_it_has(tmp_path, trace_records, real_records):
    table = summary_table([*trace_records, real_records[6]])  # one window-protocol perplexity
    markdown = write_report(_through_csv(table, tmp_path), tmp_path).read_text()
    assert sorted(_images(markdown)) == ["perplexity_vs_bits.png", "quality_trace.png"]
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
    assert _pm(1.19432, 0.0123) == "1.194 ± 0.012"
    assert _pm(0.05512, 0.0021) == "0.0551 ± 0.0021"
    assert _pm(2.7, 0.5) == "2.70 ± 0.50"
    assert _pm(0.5, 0.25, percent=True) == "50 ± 25%"
    assert _pm(1.0, 0.0) == "1 ± 0"
    assert _pm(1.375, np.nan) == "1.375"  # an old record: the value alone
    assert _pm(np.nan, 0.01) == "-"


def test_distinguishable_is_the_95_percent_test_of_two_independent_estimates():
    assert Z95 == 1.96
    # 1.96 * sqrt(2) * 0.01 = 0.0277
    assert _distinguishable(1.0, 0.01, 1.03, 0.01)
    assert _distinguishable(1.03, 0.01, 1.0, 0.01)
    assert not _distinguishable(1.0, 0.01, 1.02, 0.01)
    assert _distinguishable(1.03, 0.01, 1.0, 0.0) and not _distinguishable(1.019, 0.01, 1.0, 0.0)
    assert not _distinguishable(1.0, np.nan, 5.0, 0.01)  # no standard error: no claim


def _ratios(*estimates: tuple[str, float, float]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "name": [name for name, _, _ in estimates],
            "perplexity_ratio": [value for _, value, _ in estimates],
            "perplexity_ratio_se": [se for _, _, se in estimates],
            "scored_tokens": 4096.0,
        }
    )


def test_ranking_orders_only_what_the_intervals_separate():
    def name(row):
        return row["name"]

    rows = _ratios(("C", 1.30, 0.02), ("B", 1.06, 0.01), ("A", 1.05, 0.01))
    assert _ranking(rows, "perplexity_ratio", name) == (
        "A 1.050 ± 0.010 ≈ B 1.060 ± 0.010 < C 1.300 ± 0.020 (≈: not distinguishable on 4096 tokens)"
    )
    separated = _ratios(("A", 1.0, 0.001), ("B", 1.1, 0.001))
    assert _ranking(separated, "perplexity_ratio", name) == "A 1.0000 ± 0.0010 < B 1.1000 ± 0.0010"
    # A and C differ, but B is within noise of both: no "<" anywhere.
    chain = _ratios(("A", 1.00, 0.01), ("B", 1.02, 0.01), ("C", 1.04, 0.01))
    assert "<" not in _ranking(chain, "perplexity_ratio", name)
    # A wide interval before a "<" must be separated from everything after it too.
    wide = _ratios(("A", 1.00, 0.2), ("B", 1.01, 0.001), ("C", 1.10, 0.001))
    assert _ranking(wide, "perplexity_ratio", name).count("≈") == 3  # two joins and the note


def test_mean_of_records_combines_their_standard_errors():
    table = pd.DataFrame(
        {
            "setting": ["a", "a", "b", "b"],
            "trace": ["t0", "t1", "t0", "t1"],
            "kl_divergence": [0.1, 0.2, 0.3, 0.4],
            "kl_divergence_se": [0.03, 0.04, 0.01, np.nan],
        }
    )
    means = _mean_by(table, ["setting"], ["kl_divergence", "top1_agreement"], over=["trace"])
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
        _mean_by(table, ["model", "key_strategy"], ["kl_divergence"], over=["trace"])
    with pytest.raises(ReportError, match="the same setting measured twice"):
        _mean_by(table.assign(group_size=16.0), ["model", "key_strategy"], ["kl_divergence"])
    rows = _mean_by(table, ["model", "key_strategy", "group_size"], ["kl_divergence"])
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
    _, axes = _figure(2)
    assert _plot_lines(axes[0], table, ["line"], "perplexity_ratio", lambda row: row["line"])
    bars = [container for container in axes[0].containers if hasattr(container, "has_yerr")]
    assert len(bars) == 2 and all(container.has_yerr for container in bars)
    segments = bars[0].lines[2][0].get_segments()  # line x: the bar at 2 bits spans ± 1.96 SE
    assert segments[0][:, 1] == pytest.approx([1.3 - 1.96 * 0.02, 1.3 + 1.96 * 0.02])
    _finish(axes[0], "ratio", "ratio", table["bits"], bars=True)
    assert BARS_NOTE in axes[0].get_title() and "95%" in BARS_NOTE
    without = table.drop(columns="perplexity_ratio_se")
    assert not _plot_lines(axes[1], without, ["line"], "perplexity_ratio", lambda row: row["line"])
    assert not axes[1].containers


@pytest.fixture(scope="module")
def uncertain_report(tmp_path_factory):
    """A report of records with standard errors: MSE and KIVI-style at 4 bits within noise of each
    other, 2-bit MSE well above both, a keys-only ablation within noise of 2-bit MSE, a
    window-protocol run, one layer whose ratio stands out and one that does not."""
    records = [
        _perplexity_record(4, 1.05, se=0.01),
        _perplexity_record(4, 1.06, key_strategy="kivi", value_strategy="kivi", se=0.01),
        _perplexity_record(2, 1.30, se=0.02),
        _perplexity_record(2, 1.29, value_strategy="exact", se=0.02),
        _perplexity_record(4, 1.01, protocol="window", se=0.01),
        _perplexity_record(2, 1.25, quantized_layers=[0], se=0.01),
        _perplexity_record(2, 1.01, quantized_layers=[1], se=0.01),
    ]
    path = tmp_path_factory.mktemp("uncertain") / "report.md"
    return write_report(summary_table(records), path).read_text()


def test_tables_show_value_plus_minus_standard_error(uncertain_report):
    perplexity = _section(uncertain_report, "## 3. Perplexity")
    assert "± is one standard error over the scored tokens" in perplexity
    assert "lower bound" in perplexity
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
        "K mse 2 / V mse 2 1.300 ± 0.020 (≈: not distinguishable on 64 tokens)."
    ) in perplexity
    baselines = _section(uncertain_report, "## 6. Compared to what")
    assert (
        "TurboQuant MSE (4.57 stored bits) 1.050 ± 0.010 ≈ KIVI-style (4.57 stored bits) 1.060 ± 0.010 "
        "(≈: not distinguishable on 64 tokens)"
    ) in baselines
    ablations = _section(uncertain_report, "## 7. Ablations")
    assert (
        "perplexity ratio 1.290 ± 0.020 at 4.57 stored bits vs 1.300 ± 0.020 with the whole cache "
        "quantized (4.57 stored bits): not distinguishable on 64 tokens."
    ) in ablations
    headline = _section(uncertain_report, "## Headline")
    assert "perplexity (decode): 0 of 4 settings have a perplexity ratio not distinguishable" in headline
    assert (
        "perplexity (window, quantized context only): 1 of 1 settings have a perplexity ratio not "
        "distinguishable from 1.0 (exact) on 64 tokens: K mse 4 / V mse 4 (1.010 ± 0.010)."
    ) in headline
    assert "within 0.0" not in uncertain_report


def test_layer_sensitivity_names_the_layers_beyond_noise(uncertain_report, tmp_path):
    layers = _section(uncertain_report, "## 5. Per-layer sensitivity")
    assert "beyond its 95% interval on 64 tokens for layer 0 (1.250 ± 0.010, KL 0.1250 ± 0.0010)." in layers
    assert "layer 1 (" not in layers
    quiet = [
        _perplexity_record(2, 1.01, quantized_layers=[0], se=0.01),
        _perplexity_record(2, 0.995, quantized_layers=[1], se=0.01),
    ]
    markdown = write_report(summary_table(quiet), tmp_path).read_text()
    layers = _section(markdown, "## 5. Per-layer sensitivity")
    assert "no layer's ratio is shown to differ from 1.0 (exact): not distinguishable on 64 tokens" in layers


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
    assert "not tested, no standard error recorded" in perplexity


def test_compare_records_that_scored_enough_are_not_flagged():
    rows = pd.DataFrame(
        {
            "model": ["a", "b"],
            "prompts": [3.0, 3.0],
            "max_new_tokens": [4.0, 4.0],
            "scored_tokens": [12.0, 5.0],
        }
    )
    assert _few_scored_tokens(rows.iloc[:1]) == []
    (flag, _) = _few_scored_tokens(rows)
    assert "1 of 2 compare records" in flag and "b (5 of 12 tokens)" in flag


def test_a_baseline_at_two_group_sizes_gives_two_rows(tmp_path):
    records = [_perplexity_record(2, 1.5, key_strategy="kivi", value_strategy="kivi") for _ in range(2)]
    records[1]["config"]["cache"]["group_size"] = 16
    section = _section(write_report(summary_table(records), tmp_path / "report.md").read_text(), "## 3.")
    assert "| kivi 2 g32 | kivi 2 g32 |" in section and "| kivi 2 g16 | kivi 2 g16 |" in section
    with pytest.raises(ReportError, match="the same setting measured twice"):
        write_report(summary_table([records[0], records[0]]), tmp_path / "twice.md")
