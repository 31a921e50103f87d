"""The real SmolLM2-135M-Instruct bundle (prepared once into the persistent cache, then reused)."""

from __future__ import annotations

import pytest

from tq.bench.perplexity import run_perplexity
from tq.bench.real_model import run_real_model
from tq.kvcache import CacheConfig

PROMPTS = [
    "The history of the Roman Empire begins with",
    "Explain in one sentence what a key-value cache does in a transformer.",
]


def _compare(bundle, bits: int) -> dict:
    config = CacheConfig(key_bits=bits, value_bits=bits)
    return run_real_model(bundle, PROMPTS, "compare", config, max_new_tokens=24, threads=2)["metrics"]


def test_teacher_forced_agreement_on_smollm2(smollm2_bundle):
    eight, four = _compare(smollm2_bundle, 8), _compare(smollm2_bundle, 4)
    assert eight["top1_agreement"] >= 0.99
    assert four["logit_rmse"] > eight["logit_rmse"]
    assert eight["quantized_kv"]["kv_compression_ratio"] > 3


def test_wikipedia_perplexity_on_smollm2(smollm2_bundle, persistent_cache_dir):
    def ratio(bits: int) -> dict:
        config = CacheConfig(key_bits=bits, value_bits=bits)
        return run_perplexity(
            smollm2_bundle, config, windows=2, window=384, context=192, threads=2, cache=persistent_cache_dir
        )["metrics"]

    two, eight = ratio(2), ratio(8)
    # SmolLM2-135M on English Wikipedia: about 18.5 over 1024-token windows (DESIGN.md section 10)
    assert 8 < eight["exact_perplexity"] < 40
    assert eight["perplexity_ratio"] == pytest.approx(1.0, abs=0.01)
    assert two["perplexity_ratio"] > 1.3
    assert two["exact_perplexity"] == eight["exact_perplexity"]
