"""The ONNX Runtime decode loop and the real-model workloads, on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.models_fixtures import tiny_gpt2, tiny_llama
from tq.bench.real_model import run_real_model
from tq.cli import main
from tq.kvcache import CacheConfig, MultiHeadKVCache
from tq.models import ModelBundle, prepare_bundle
from tq.runner import RealModelRunner

PROMPT = "the quick brown fox jumps over the lazy dog"
EXACT = CacheConfig(key_strategy="exact", value_strategy="exact")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tmp_path_factory):
    """(HF model directory, bundle directory) of a tiny random model."""
    root = tmp_path_factory.mktemp(request.param)
    build = tiny_llama if request.param == "llama" else tiny_gpt2
    model_dir = build(root / "hf")
    return model_dir, prepare_bundle(model_dir=model_dir, out=root / "bundle")


def test_ort_loop_equals_transformers_greedy_generate(tiny):
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, bundle_dir = tiny
    bundle = ModelBundle.load(bundle_dir)
    ids = bundle.encode(PROMPT)
    ours = RealModelRunner(bundle).generate(ids, 24, stop_at_eos=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        theirs = model.generate(
            torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert ours.tokens == theirs[0, len(ids) :].tolist()
    assert ours.logits.shape == (24, bundle.vocab_size)


def test_exact_cache_through_the_quantized_path_changes_nothing(tiny):
    bundle = ModelBundle.load(tiny[1])
    runner = RealModelRunner(bundle)
    ids = bundle.encode(PROMPT)
    plain = runner.generate(ids, 12, stop_at_eos=False)
    cached = runner.generate(ids, 12, cache=runner.new_cache(EXACT), stop_at_eos=False)
    assert cached.tokens == plain.tokens
    np.testing.assert_array_equal(cached.logits, plain.logits)


def test_the_past_fed_back_is_the_cache_reconstruction(tiny):
    """quantize_presents patches the graph's presents in place: they must equal keys()/values()."""
    bundle = ModelBundle.load(tiny[1])
    runner = RealModelRunner(bundle)
    cache = runner.new_cache(CacheConfig(key_bits=2, value_bits=3, residual_length=3))
    ids = bundle.encode(PROMPT)
    _, past = runner.prefill(ids, cache)
    for token in (4, 5, 6, 7):
        _, past = runner.extend([token], past, cache)
        for layer, (key, value) in zip(cache.layers, past, strict=True):
            np.testing.assert_array_equal(key[0], layer.keys())
            np.testing.assert_array_equal(value[0], layer.values())
    assert len(cache[0]) == len(ids) + 4
    assert cache[0].quantized_tokens == len(ids) + 4 - 3


def test_teacher_forcing_follows_the_given_tokens(tiny):
    bundle = ModelBundle.load(tiny[1])
    runner = RealModelRunner(bundle)
    ids = bundle.encode(PROMPT)
    forced = [3, 4, 5, 6, 7]
    run = runner.generate(ids, 0, cache=runner.new_cache(CacheConfig(key_bits=2)), forced_tokens=forced)
    assert run.tokens == forced and run.logits.shape[0] == 5


def test_drift_shrinks_with_bits_and_8_bits_is_nearly_exact(tiny):
    record = {
        bits: run_real_model(
            tiny[1],
            [PROMPT, "a cache holds the keys"],
            "compare",
            CacheConfig(key_bits=bits, value_bits=bits),
            max_new_tokens=12,
        )["metrics"]
        for bits in (2, 4, 8)
    }
    rmse = [record[bits]["logit_rmse"] for bits in (2, 4, 8)]
    assert rmse[0] > rmse[1] > rmse[2]
    assert record[8]["top1_agreement"] >= 0.9
    assert record[8]["kl_divergence"] < record[4]["kl_divergence"] / 10
    assert record[8]["quantized_kv"]["kv_compression_ratio"] > 3


def test_compare_of_exact_against_exact_has_zero_drift(tiny):
    metrics = run_real_model(tiny[1], [PROMPT], "compare", EXACT, max_new_tokens=10)["metrics"]
    assert metrics["logit_rmse"] == 0.0
    assert metrics["kl_divergence"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["top1_agreement"] == 1.0 and metrics["topk_agreement"] == 1.0
    assert metrics["token_match_rate"] == 1.0 and metrics["divergence_rate"] == 0.0
    assert metrics["first_divergence_steps"] == [None]
    assert metrics["cross_entropy"] == pytest.approx(metrics["exact_cross_entropy"])


def test_real_model_cli_writes_a_record(tiny, tmp_path, capsys):
    out = tmp_path / "record.json"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the quick brown fox"}\n{"prompt": "queries attend to keys"}\n')
    args = ["bench", "--workload", "real-model", "--real-model-dir", str(tiny[1]), "--prompts", str(prompts)]
    args += ["--real-eval-mode", "compare", "--bits", "4", "--value-bits", "3", "--real-key-strategy", "prod"]
    args += ["--top-k", "3", "--max-new-tokens", "6", "--exact-first-layers", "1", "--json", str(out)]
    assert main(args) == 0
    record = json.loads(out.read_text())
    assert record["source"] == "real-model"
    assert record["config"]["cache"]["key_strategy"] == "prod"
    assert record["config"]["cache"]["value_bits"] == 3
    assert record["config"]["exact_layers"] == [0]
    assert len(record["metrics"]["per_prompt"]) == 2
    assert "decode_tokens_per_s" in record["timing"]["quantized"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "needs exactly one of --prompt TEXT or --prompts FILE"),
        (["--prompt", "a", "--prompts", "p.txt"], "needs exactly one of --prompt TEXT or --prompts FILE"),
        (["--prompt", "a", "--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
    ],
)
def test_real_model_cli_errors(tiny, extra, message, capsys):
    assert main(["bench", "--workload", "real-model", "--real-model-dir", str(tiny[1]), *extra]) == 2
    assert message in capsys.readouterr().err


def test_real_model_needs_a_bundle(capsys):
    assert main(["bench", "--workload", "real-model", "--prompt", "hi"]) == 2
    assert "needs --real-model-dir DIR" in capsys.readouterr().err


def test_quantize_presents_handles_every_layer_at_once():
    cache = MultiHeadKVCache(3, 2, 16, CacheConfig(key_bits=3))
    rng = np.random.default_rng(0)
    presents = [
        tuple(rng.standard_normal((1, 2, 5, 16)).astype(np.float32) for _ in range(2)) for _ in range(3)
    ]
    exact = [(k.copy(), v.copy()) for k, v in presents]
    past = RealModelRunner.quantize_presents(cache, presents, 0)
    for layer, (key, value), (exact_key, _) in zip(cache.layers, past, exact, strict=True):
        np.testing.assert_array_equal(key[0], layer.keys())
        np.testing.assert_array_equal(value[0], layer.values())
        assert np.any(key != exact_key)
