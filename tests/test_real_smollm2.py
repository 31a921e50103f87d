"""The real SmolLM2-135M-Instruct bundle (prepared once into the persistent cache, then reused)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tq.cache.config import CacheConfig
from tq.cli import main
from tq.engines.onnx import OnnxRunner
from tq.models.bundle import ModelBundle
from tq.tasks import metrics
from tq.tasks.compare import run_real_model
from tq.tasks.exact_run import KL_TOLERANCE
from tq.tasks.perplexity import perplexity_reference, run_perplexity

PROMPTS = [
    "The history of the Roman Empire begins with",
    "Water treatment plants remove impurities from river water in several stages. First,",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "The three most important ideas in the theory of evolution are",
]
STEPS = 40  # 4 prompts x 40 teacher-forced steps: one flip at a near-tie still leaves 0.994


def _teacher_forced(bundle_dir, bits: int) -> tuple[float, float]:
    """(top-1 agreement, logit RMSE) of a bits-wide MSE cache following the exact run's tokens."""
    bundle = ModelBundle.load(bundle_dir)
    runner = OnnxRunner(bundle, threads=2)
    exact_logits, forced_logits = [], []
    for prompt in PROMPTS:
        ids = bundle.encode(prompt)
        exact = runner.generate(ids, STEPS, stop_at_eos=False)
        cache = runner.new_cache(CacheConfig(key_bits=bits, value_bits=bits))
        forced = runner.generate(ids, 0, cache=cache, forced_tokens=exact.tokens)
        exact_logits.append(exact.logits)
        forced_logits.append(forced.logits)
    exact_all, forced_all = np.concatenate(exact_logits), np.concatenate(forced_logits)
    return metrics.top1_agreement(exact_all, forced_all), metrics.logit_rmse(exact_all, forced_all)


def test_teacher_forced_agreement_on_smollm2(smollm2_bundle):
    top1_eight, rmse_eight = _teacher_forced(smollm2_bundle, 8)
    _, rmse_four = _teacher_forced(smollm2_bundle, 4)
    assert top1_eight >= 0.99
    assert rmse_four > rmse_eight


def test_compare_workload_on_smollm2(smollm2_bundle):
    record = run_real_model(
        smollm2_bundle, PROMPTS[:2], "compare", CacheConfig(key_bits=4), max_new_tokens=12, threads=2
    )
    assert record["metrics"]["quantized_kv"]["kv_compression_ratio"] > 3
    assert record["metrics"]["teacher_forced_steps"] >= 2
    assert record["config"]["model"] == "smollm2-135m-instruct"


def test_wikipedia_perplexity_on_smollm2(smollm2_bundle, persistent_cache_dir):
    reference = perplexity_reference(smollm2_bundle, 2, 320, 192, threads=2, cache=persistent_cache_dir)

    def run(bits: int, protocol: str, windows: int = 2) -> dict:
        config = CacheConfig(key_bits=bits, value_bits=bits)
        record = run_perplexity(
            smollm2_bundle, config, windows=windows, window=320, context=192, threads=2,
            protocol=protocol, reference=reference if windows == 2 else None, cache=persistent_cache_dir,
        )  # fmt: skip
        return record["metrics"]

    eight, two = run(8, "window"), run(2, "window")
    # SmolLM2-135M on English Wikipedia: about 18.5 over 1024-token windows (docs/design.md section 10)
    assert 8 < eight["exact_perplexity"] < 40
    assert eight["perplexity_ratio"] == pytest.approx(1.0, abs=0.01)
    assert two["perplexity_ratio"] > eight["perplexity_ratio"]
    assert two["exact_perplexity"] == eight["exact_perplexity"]
    # token by token, every scored token's keys and values are quantized too: a larger effect,
    # beyond the window protocol's by more than both intervals
    decoded = run(2, "decode")
    assert decoded["perplexity_ratio"] > 1.3
    gap = decoded["perplexity_ratio"] - two["perplexity_ratio"]
    assert gap > 2 * np.hypot(decoded["perplexity_ratio_se"], two["perplexity_ratio_se"])


def test_the_exact_reference_matches_the_exact_decode_loop_on_smollm2(smollm2_bundle, persistent_cache_dir):
    """The reference's one call per window equals decoding the exact model token by token, and
    its compact encoding keeps KL(exact || quantized) within KL_TOLERANCE of the computation from
    the full logits (the figure docs/design.md and tq.tasks.exact_run state)."""
    bundle = ModelBundle.load(smollm2_bundle)
    runner = OnnxRunner(bundle, threads=2)
    reference = perplexity_reference(smollm2_bundle, 1, 320, 192, threads=2, cache=persistent_cache_dir)
    tokens, targets = reference.sequence(0)
    decoded = runner.generate(tokens[:192].tolist(), 0, forced_tokens=targets.tolist()).logits
    single = runner.prefill(tokens[:-1])[0][191:]
    np.testing.assert_allclose(decoded, single, rtol=0, atol=1e-4 * np.abs(single).max())
    cache = runner.new_cache(CacheConfig(key_bits=2, value_bits=2))
    quantized = runner.generate(tokens[:192].tolist(), 0, cache, forced_tokens=targets.tolist()).logits
    log_p, log_q = metrics.log_softmax(single), metrics.log_softmax(quantized)
    full = np.sum(np.exp(log_p) * (log_p - log_q), axis=1)
    compact = reference.compare(0, quantized)["kl"]
    assert full.mean() > 0.05  # a 2-bit cache: far from a trivial comparison
    assert np.abs(compact - full).max() < KL_TOLERANCE


def test_the_reference_crates_headline_command_on_smollm2(smollm2_bundle, tmp_path, capsys):
    """Once a ZeroDivisionError traceback (the tokens/s ratio); now a record, with any speed that
    cannot be computed null and its reason given."""
    out = tmp_path / "out.json"
    args = ["bench", "--workload", "real-model", "--real-model-dir", str(smollm2_bundle)]
    args += ["--prompt", "Explain why the sky looks blue at noon but red at sunset.", "--real-eval-mode"]
    args += ["compare", "--bits", "4", "--max-new-tokens", "12", "--threads", "2", "--json", str(out)]
    assert main(args) == 0
    metrics_ = json.loads(out.read_text())["metrics"]
    ratio = metrics_["decode_speed_ratio"]
    assert (ratio is None and metrics_["decode_speed_ratio_reason"]) or ratio > 0
    assert "Traceback" not in capsys.readouterr().err
