"""The ONNX Runtime decode loop and the real-model workloads, on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.models_fixtures import tiny_gpt2, tiny_llama
from tq.cache.config import CacheConfig
from tq.cache.kvcache import MultiHeadKVCache
from tq.cli import main
from tq.engines.onnx import OnnxRunner
from tq.models.bundle import ModelBundle
from tq.models.prepare import prepare_bundle
from tq.tasks.compare import run_real_model

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
    ours = OnnxRunner(bundle).generate(ids, 24, stop_at_eos=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        theirs = model.generate(
            torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert ours.tokens == theirs[0, len(ids) :].tolist()
    assert ours.logits.shape == (24, bundle.vocab_size)


def test_exact_cache_through_the_quantized_path_changes_nothing(tiny):
    bundle = ModelBundle.load(tiny[1])
    runner = OnnxRunner(bundle)
    ids = bundle.encode(PROMPT)
    plain = runner.generate(ids, 12, stop_at_eos=False)
    cached = runner.generate(ids, 12, cache=runner.new_cache(EXACT), stop_at_eos=False)
    assert cached.tokens == plain.tokens
    np.testing.assert_array_equal(cached.logits, plain.logits)


def test_the_past_fed_back_is_the_cache_reconstruction(tiny):
    """quantize_presents patches the graph's presents in place: they must equal keys()/values()."""
    bundle = ModelBundle.load(tiny[1])
    runner = OnnxRunner(bundle)
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
    runner = OnnxRunner(bundle)
    ids = bundle.encode(PROMPT)
    forced = [3, 4, 5, 6, 7]
    run = runner.generate(ids, 0, cache=runner.new_cache(CacheConfig(key_bits=2)), forced_tokens=forced)
    assert run.tokens == forced and run.logits.shape[0] == 5


@pytest.mark.parametrize("config", [None, CacheConfig(key_bits=3, value_bits=2)], ids=["exact", "quantized"])
def test_generate_continues_a_given_past(tiny, config):
    """Greedy decoding after a past (the needle task's protocol: a quantized context, then the
    question in one call) equals continuing the calls by hand."""
    bundle = ModelBundle.load(tiny[1])
    runner = OnnxRunner(bundle)
    ids = bundle.encode(PROMPT)
    context, question = ids[:5], ids[5:]
    caches = [None if config is None else runner.new_cache(config) for _ in range(2)]
    _, past = runner.prefill(context, caches[0])
    run = runner.generate(question, 6, caches[0], stop_at_eos=False, past=past)
    _, past = runner.prefill(context, caches[1])
    logits, past = runner.extend(question, past, caches[1])
    tokens = [int(np.argmax(logits[-1]))]
    while len(tokens) < 6:
        logits, past = runner.extend(tokens[-1:], past, caches[1])
        tokens.append(int(np.argmax(logits[-1])))
    assert run.tokens == tokens and run.logits.shape[0] == 6
    if config is None:
        assert run.kv_nbytes == runner.past_nbytes(past)
    else:
        assert run.kv_nbytes == caches[0].nbytes == caches[1].nbytes
        assert len(caches[0][0]) == len(ids) + 5


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
    past = OnnxRunner.quantize_presents(cache, presents, 0)
    for layer, (key, value), (exact_key, _) in zip(cache.layers, past, exact, strict=True):
        np.testing.assert_array_equal(key[0], layer.keys())
        np.testing.assert_array_equal(value[0], layer.values())
        assert np.any(key != exact_key)


@pytest.mark.parametrize("config", [None, CacheConfig(key_bits=3, value_bits=2)], ids=["exact", "quantized"])
def test_batched_decode_equals_the_one_sequence_loop(tiny, config):
    """Several sequences in one graph call, each with its own cache, give the logits of one
    sequence at a time within 1e-4 of the logit scale."""
    bundle = ModelBundle.load(tiny[1])
    runner = OnnxRunner(bundle)
    rng = np.random.default_rng(0)
    vocabulary = bundle.encode(PROMPT)
    prompts = rng.choice(vocabulary, (3, 7))
    forced = rng.choice(vocabulary, (3, 9))
    caches = None if config is None else [runner.new_cache(config) for _ in range(3)]
    steps: list[int] = []
    batched = runner.teacher_force(prompts, forced, caches, on_step=steps.append)
    assert batched.shape[:2] == (3, 9) and steps == list(range(1, 9))
    for row in range(3):
        cache = None if config is None else runner.new_cache(config)
        single = runner.generate(prompts[row].tolist(), 0, cache, forced_tokens=forced[row].tolist()).logits
        scale = np.abs(single).max()
        np.testing.assert_allclose(batched[row], single, rtol=0, atol=1e-4 * scale)
        if cache is not None:
            assert caches[row].nbytes == cache.nbytes
            np.testing.assert_array_equal(caches[row].layers[0].keys(), cache.layers[0].keys())


def test_teacher_force_refuses_mismatched_shapes(tiny):
    runner = OnnxRunner(ModelBundle.load(tiny[1]))
    with pytest.raises(ValueError, match="need prompts"):
        runner.teacher_force(np.zeros((2, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="1 caches for a batch of 2"):
        runner.teacher_force(np.zeros((2, 3)), np.zeros((2, 4)), [runner.new_cache(EXACT)])


def test_compare_with_no_decode_step_reports_speed_as_null(tiny, tmp_path):
    """A compare run whose answers end at their first token has no decode speed: null with the
    reason, not a ZeroDivisionError (the reference crate's headline command once ended so)."""
    out = tmp_path / "record.json"
    args = ["bench", "--workload", "real-model", "--real-model-dir", str(tiny[1]), "--prompt", PROMPT]
    args += ["--real-eval-mode", "compare", "--bits", "4", "--max-new-tokens", "1", "--json", str(out)]
    assert main(args) == 0
    record = json.loads(out.read_text())
    assert record["metrics"]["decode_speed_ratio"] is None
    assert "no decode step" in record["metrics"]["decode_speed_ratio_reason"]
    assert record["timing"]["exact"]["decode_tokens_per_s"] is None


def test_compare_reads_the_baseline_reference(tiny, tmp_path):
    """Compare mode with the exact mode's reference gives the metrics of a compare run that
    makes its own exact runs, and refuses a reference of other prompts or settings."""
    from tq.tasks.exact_run import ReferenceError

    path = tmp_path / "baseline.safetensors"
    prompts = [PROMPT, "keys and values"]
    baseline = run_real_model(tiny[1], prompts, "exact", max_new_tokens=6, reference_out=path)
    config = CacheConfig(key_bits=3, value_bits=3)
    own = run_real_model(tiny[1], prompts, "compare", config, max_new_tokens=6)["metrics"]
    read = run_real_model(tiny[1], prompts, "compare", config, max_new_tokens=6, reference=path)
    for name in ("logit_rmse", "kl_divergence", "kl_divergence_se", "top1_agreement", "perplexity_ratio"):
        assert read["metrics"][name] == pytest.approx(own[name], rel=1e-6, abs=1e-9), name
    assert read["config"]["exact_runs"] == "read from the reference"
    assert read["timing"]["exact"] == baseline["timing"]["exact"]
    with pytest.raises(ReferenceError, match="prompt 0 is not the one"):
        run_real_model(
            tiny[1],
            ["another prompt", "keys and values"],
            "compare",
            config,
            max_new_tokens=6,
            reference=path,
        )
    with pytest.raises(ReferenceError, match="max_new_tokens=6, this job needs max_new_tokens=5"):
        run_real_model(tiny[1], prompts, "compare", config, max_new_tokens=5, reference=path)


def _tiny_perplexity(tiny, cache_dir, **options) -> dict:
    from tq.tasks.perplexity import run_perplexity

    settings = {"windows": 3, "window": 48, "context": 24, "cache": cache_dir}
    return run_perplexity(tiny[1], CacheConfig(key_bits=2, value_bits=2), **(settings | options))


def test_perplexity_batches_and_references_agree(tiny, tmp_path, persistent_cache_dir):
    """Decoding the windows together, or one at a time, or against a saved reference gives the
    same per-token values; a reference made for other windows is refused."""
    from tq.tasks.exact_run import ReferenceError
    from tq.tasks.perplexity import perplexity_reference

    one = _tiny_perplexity(tiny, persistent_cache_dir, batch=1)
    path = tmp_path / "reference.safetensors"
    perplexity_reference(tiny[1], 3, 48, 24, cache=persistent_cache_dir).save(path)
    together = _tiny_perplexity(tiny, persistent_cache_dir, batch=2, reference=path)
    for name in ("exact_nll", "quantized_nll", "kl", "delta_p"):
        np.testing.assert_allclose(
            one["metrics"]["per_token"][name], together["metrics"]["per_token"][name], atol=1e-5
        )
    metrics = together["metrics"]
    assert metrics["scored_tokens"] == 72 == len(metrics["per_token"]["kl"])
    assert metrics["perplexity_ratio_se"] > 0 and metrics["kl_divergence_se"] > 0
    assert together["config"]["batch"] == 2 and together["config"]["reference"] == str(path)
    with pytest.raises(ReferenceError, match="made for windows=3, this job needs windows=2"):
        _tiny_perplexity(tiny, persistent_cache_dir, windows=2, reference=path)
    with pytest.raises(ReferenceError, match="made for sample_seed=0, this job needs sample_seed=1"):
        _tiny_perplexity(tiny, persistent_cache_dir, sample_seed=1, reference=path)


def test_perplexity_windows_come_from_across_the_text_and_are_the_unit(tiny, persistent_cache_dir):
    """The record names each window's article and offset (one article per window here), keeps
    every window's means, and states its errors over windows beside the per-token ones."""
    from tq.data.corpus import corpus_articles

    record = _tiny_perplexity(tiny, persistent_cache_dir, windows=4)
    config, metrics = record["config"], record["metrics"]
    drawn = config["text_windows"]
    assert len(drawn) == 4 and len({w["article"] for w in drawn}) == 4
    assert config["sample_seed"] == 0 and config["se_unit"] == "window"
    titles = [title for title, _ in corpus_articles(persistent_cache_dir)]
    assert [w["title"] for w in drawn] == [titles[w["article"]] for w in drawn]
    assert (
        drawn
        != _tiny_perplexity(tiny, persistent_cache_dir, windows=4, sample_seed=1)["config"]["text_windows"]
    )
    per_window, per_token = metrics["per_window"], metrics["per_token"]
    assert per_window["tokens"] == [24] * 4 and metrics["clusters"] == 4
    kl = np.asarray(per_token["kl"]).reshape(4, 24).mean(axis=1)
    np.testing.assert_allclose(per_window["kl"], kl)
    assert per_token["window"] == np.repeat(np.arange(4), 24).tolist()
    assert metrics["kl_divergence_se"] == pytest.approx(np.std(kl, ddof=1) / 2)
    assert metrics["kl_divergence_se_token"] == pytest.approx(np.std(per_token["kl"], ddof=1) / np.sqrt(96))


def test_perplexity_protocols_share_the_exact_side(tiny, persistent_cache_dir):
    decode = _tiny_perplexity(tiny, persistent_cache_dir)["metrics"]
    window = _tiny_perplexity(tiny, persistent_cache_dir, protocol="window")["metrics"]
    assert window["exact_perplexity"] == decode["exact_perplexity"]
    assert window["perplexity_ratio"] != decode["perplexity_ratio"]
    with pytest.raises(ValueError, match="protocol must be one of"):
        _tiny_perplexity(tiny, persistent_cache_dir, protocol="sliding")
    with pytest.raises(ValueError, match="batch must be at least 1"):
        _tiny_perplexity(tiny, persistent_cache_dir, batch=0)
