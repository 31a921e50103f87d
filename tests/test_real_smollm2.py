"""The real SmolLM2-135M-Instruct bundle (prepared once into the persistent cache, then reused)."""

from __future__ import annotations

import numpy as np
import pytest

from tq import metrics
from tq.bench.perplexity import run_perplexity
from tq.bench.real_model import run_real_model
from tq.kvcache import CacheConfig
from tq.models import ModelBundle
from tq.runner import RealModelRunner

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
    runner = RealModelRunner(bundle, threads=2)
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
    def run(bits: int, protocol: str, windows: int) -> dict:
        config = CacheConfig(key_bits=bits, value_bits=bits)
        record = run_perplexity(
            smollm2_bundle, config, windows=windows, window=320, context=192, threads=2,
            cache=persistent_cache_dir, protocol=protocol,
        )  # fmt: skip
        return record["metrics"]

    eight, two = run(8, "window", 2), run(2, "window", 2)
    # SmolLM2-135M on English Wikipedia: about 18.5 over 1024-token windows (DESIGN.md section 10)
    assert 8 < eight["exact_perplexity"] < 40
    assert eight["perplexity_ratio"] == pytest.approx(1.0, abs=0.01)
    assert two["perplexity_ratio"] > eight["perplexity_ratio"]
    assert two["exact_perplexity"] == eight["exact_perplexity"]
    # token by token, every scored token's keys and values are quantized too: a larger effect
    decoded = run(2, "decode", 1)
    assert decoded["perplexity_ratio"] > 1.3
