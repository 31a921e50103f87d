"""The trace workload: zero error for exact caches, errors that shrink as bits grow."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from tq.cache.config import CacheConfig
from tq.cli import main
from tq.data.trace import KvTrace
from tq.tasks.records import SCHEMA
from tq.tasks.trace_eval import attention_errors, run_trace


def _trace(samples: int = 3, seq: int = 96, dim: int = 64, queries: int = 8) -> KvTrace:
    """A trace shaped like a real head: a few large key channels, queries aligned with keys."""
    rng = np.random.default_rng(21)
    keys = rng.standard_normal((samples, seq, dim)).astype(np.float32)
    keys[:, :, :3] *= 6
    values = rng.standard_normal((samples, seq, dim)).astype(np.float32)
    positions = np.sort(rng.choice(np.arange(8, seq), size=(samples, queries)), axis=1)
    picked = np.take_along_axis(keys, positions[:, :, None], axis=1)
    queries_ = (2.0 * picked + rng.standard_normal(picked.shape)).astype(np.float32)
    return KvTrace(keys, values, queries_, positions.astype(np.int64), "synthetic-test", 0, 0, "none")


@pytest.fixture
def trace_path(tmp_path):
    path = tmp_path / "trace.safetensors"
    _trace().save(path)
    return path


def test_exact_cache_has_zero_error(trace_path):
    record = run_trace(trace_path, CacheConfig(key_strategy="exact", value_strategy="exact"))
    assert record["schema"] == SCHEMA and record["source"] == "trace"
    metrics = record["metrics"]
    assert metrics["score_rmse"] == 0.0
    assert metrics["softmax_kl"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["topk_overlap"] == 1.0
    assert metrics["output_relative_error"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["compression_ratio"] == 1.0


@pytest.mark.parametrize("strategy", ["mse", "prod"])
def test_errors_shrink_as_bits_grow(trace_path, strategy):
    results = [
        run_trace(trace_path, CacheConfig(key_bits=bits, value_bits=bits, key_strategy=strategy))["metrics"]
        for bits in (2, 3, 4, 6)
    ]
    for name in ("score_rmse", "softmax_kl", "output_relative_error"):
        series = [m[name] for m in results]
        assert all(a > b for a, b in itertools.pairwise(series)), (name, series)
    assert results[-1]["topk_overlap"] > results[0]["topk_overlap"]
    assert [m["key_bits"] for m in results] == [2, 3, 4, 6]
    assert results[0]["compression_ratio"] > results[-1]["compression_ratio"] > 1


def test_fractional_widths_and_window_in_the_record(trace_path):
    config = CacheConfig(key_bits=2.5, value_bits=3, residual_length=16)
    record = run_trace(trace_path, config, top_k=4)
    assert record["metrics"]["key_bits"] == 2.5
    assert record["config"]["cache"]["residual_length"] == 16
    assert record["config"]["top_k"] == 4
    assert record["config"]["samples"] == 3 and record["config"]["seq_len"] == 96


def test_metrics_against_a_hand_computed_case():
    """One sample, one query at position 1, keys of dimension 2: every metric by hand."""
    keys = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
    values = np.array([[[1.0, 0.0], [0.0, 2.0]]], np.float32)
    trace = KvTrace(keys, values, np.array([[[2.0, 0.0]]], np.float32), np.array([[1]]), "hand", 0, 0, "none")
    shifted = keys.copy()
    shifted[0, 1] = [0.0, 0.0]  # the second key's score drops from 0 to 0: unchanged
    shifted[0, 0] = [0.5, 0.0]  # the first key's score drops from 2/sqrt(2) to 1/sqrt(2)
    metrics = attention_errors(trace, shifted, values, top_k=1)
    s = np.sqrt(2.0)
    assert metrics["score_rmse"] == pytest.approx(np.sqrt((s - s / 2) ** 2 / 2))
    p = np.exp([s, 0.0]) / np.exp([s, 0.0]).sum()
    q = np.exp([s / 2, 0.0]) / np.exp([s / 2, 0.0]).sum()
    assert metrics["softmax_kl"] == pytest.approx(float(np.sum(p * np.log(p / q))))
    assert metrics["topk_overlap"] == 1.0
    reference, approximate = p @ values[0], q @ values[0]
    assert metrics["output_relative_error"] == pytest.approx(
        np.linalg.norm(approximate - reference) / np.linalg.norm(reference)
    )


def test_bad_top_k_is_refused(trace_path):
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        run_trace(trace_path, CacheConfig(), top_k=0)
    visible = int(KvTrace.load(trace_path).query_positions.max()) + 1
    with pytest.raises(ValueError, match=f"top_k {visible} is not below the {visible} keys"):
        run_trace(trace_path, CacheConfig(), top_k=visible)


def test_cli_trace_workload_writes_the_record(trace_path, tmp_path, capsys):
    out = tmp_path / "record.json"
    args = ["bench", "--workload", "trace", "--trace", str(trace_path), "--bits", "2.5", "--strategy", "mse"]
    code = main([*args, "--value-bits", "3", "--value-strategy", "prod", "--top-k", "4", "--json", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    assert record["source"] == "trace"
    assert record["config"]["cache"]["key_bits"] == 2.5
    assert record["config"]["cache"]["value_strategy"] == "prod"
    assert record["metrics"]["value_bits"] == 3
    assert "softmax KL" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workload", "trace"], "the trace workload needs --trace PATH"),
        (["--workload", "trace", "--trace", "missing.safetensors"], "missing.safetensors"),
        (["--workload", "synthetic", "--bits", "2.5"], "the synthetic workload needs whole --bits, got 2.5"),
        (["--workload", "synthetic", "--strategy", "exact", "--dim", "16"], "strategy must be one of"),
    ],
)
def test_cli_trace_errors(args, message, capsys):
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err
