"""tq inside Hugging Face transformers (tq.engines.transformers_cache, tq.engines.transformers).

Tolerances. ``LOGIT_TOLERANCE`` = 1e-4 of the logit scale (max |logit|) between the packed and
the reconstruct path: both attend over the same stored codes; the packed path scores in the
rotated domain in float32 (tests/test_attention.py: outputs within 1e-5 relative, measured
<= 1e-6), and a relative error e in an attention output moves the logits by about e times their
scale. Between transformers and the ONNX Runtime loop the float arithmetic differs (different
kernels, fused ops): exact runs agree within LOGIT_TOLERANCE (measured 1.3e-6 of the scale), but
with a quantized cache keys that differ by ~1e-6 relative now and then fall on the other side of
a codebook boundary (thousands of coordinates per token), and each such flip perturbs every
later token: the two quantized runs drift apart (on SmolLM2 one window stays within 1e-6 for
12 steps, the other passes 1e-3 at step 6). They are two realizations of the same quantization,
so they are compared statistically: the mean of the paired per-token NLL differences must be
within AGREEMENT_SE standard errors of zero (measured on the test's windows: -0.032 +- 0.021
nats, 1.5 SE; a systematic difference such as an unquantized context moves it by ~0.17).

The tiny random models amplify every perturbation (an 8-bit cache changes their logits by about
1 on a scale of 14: random weights, large activations), so on them generation is checked with the
exact strategy, which must equal transformers' own DynamicCache token for token; SmolLM2 checks
the 8-bit cache.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

from tests.models_fixtures import tiny_gemma3, tiny_llama  # noqa: E402
from tq.cache.config import CacheConfig  # noqa: E402
from tq.engines.transfers import HostTransfers  # noqa: E402
from tq.engines.transformers import TransformersRunner  # noqa: E402
from tq.engines.transformers_cache import TurboQuantCache  # noqa: E402
from tq.models.checkpoint import Checkpoint  # noqa: E402

LOGIT_TOLERANCE = 1e-4
AGREEMENT_SE = 3.0
EXACT = CacheConfig(key_strategy="exact", value_strategy="exact")
MODELS = {"llama": tiny_llama, "gemma3": tiny_gemma3}  # gemma3: layer 0 slides over 8 tokens


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny-hf")
    return {name: make(base / name) for name, make in MODELS.items()}


def load(path, attention: str = "sdpa"):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention).eval()


def runner(path, attention: str = "sdpa") -> TransformersRunner:
    return TransformersRunner(Checkpoint.load(path), attention=attention)


def tokens(model, shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, model.config.vocab_size, shape)


def greedy(model, ids: np.ndarray, cache, new_tokens: int = 32, **options) -> np.ndarray:
    out = model.generate(
        torch.from_numpy(ids),
        attention_mask=torch.ones(ids.shape, dtype=torch.long),
        past_key_values=cache,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        **options,
    )
    return out[:, ids.shape[1] :].numpy()


def assert_logits_close(actual: np.ndarray, expected: np.ndarray) -> None:
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    assert error <= LOGIT_TOLERANCE, error


@pytest.mark.parametrize("attention", ["sdpa", "tq_packed"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_exact_strategy_generates_what_dynamic_cache_generates(tiny_dirs, name, attention):
    """Greedy generation of 2 sequences x 32 tokens (past Gemma 3's 8-token window): the cache
    mechanics (what each call attends to, masks, positions, sliding layers) equal transformers'."""
    model = load(tiny_dirs[name], attention)
    ids = tokens(model, (2, 6), seed=0)
    expected = greedy(model, ids, DynamicCache(config=model.config))
    assert np.array_equal(greedy(model, ids, TurboQuantCache(model.config, EXACT)), expected)


def test_beam_search_reorders_the_per_sequence_caches(tiny_dirs):
    model = load(tiny_dirs["llama"])
    ids = tokens(model, (1, 5), seed=1)
    expected = greedy(model, ids, DynamicCache(config=model.config), 12, num_beams=3)
    actual = greedy(model, ids, TurboQuantCache(model.config, EXACT), 12, num_beams=3)
    assert np.array_equal(actual, expected)


@pytest.mark.parametrize(
    "config",
    [
        CacheConfig(key_bits=3, value_bits=3),
        CacheConfig(key_strategy="prod", key_bits=3, value_bits=2.5, residual_length=4),
    ],
    ids=["mse3", "prod3-window"],
)
@pytest.mark.parametrize("kernels", ["numba", "torch"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_packed_attention_equals_the_reconstruct_path(tiny_dirs, name, config, kernels):
    """Teacher-forced decoding (prefill 10 tokens, then 29 steps of one token for 2 sequences
    in one call): attention from the packed codes (tq's Numba CPU kernels, or torch) gives the
    reconstruct path's logits, and the packed caches hold no float copy of their quantized
    tokens."""
    vocabulary = load(tiny_dirs[name])
    prompts, forced = tokens(vocabulary, (2, 10), 2), tokens(vocabulary, (2, 30), 3)
    layer_configs = {1: EXACT} if name == "llama" else None
    results, reports = {}, {}
    for attention in ("sdpa", "tq_packed"):
        engine = runner(tiny_dirs[name], attention)
        caches = [
            TurboQuantCache(engine.model.config, config, layer_configs=layer_configs, packed_kernels=kernels)
            for _ in prompts
        ]
        results[attention] = engine.teacher_force(prompts, forced, caches)
        reports[attention] = [cache.memory_report() for cache in caches]
    assert_logits_close(results["tq_packed"], results["sdpa"])
    for kept, packed in zip(reports["sdpa"], reports["tq_packed"], strict=True):
        assert kept["keep_reconstruction"] and not packed["keep_reconstruction"]
        assert packed["stored_bytes"] == kept["stored_bytes"] < kept["fp32_bytes"]
        assert packed["buffer_bytes"] < kept["buffer_bytes"]
        assert packed["layers"][0]["tokens"] == 39 and packed["layers"][0]["sequences"] == 1


def test_refusals(tiny_dirs):
    engine = runner(tiny_dirs["llama"])
    model = engine.model
    with pytest.raises(ValueError, match=r"layers \[5\] are outside the model's layers 0..1"):
        TurboQuantCache(model.config, exact_layers=[5])
    cache = TurboQuantCache(model.config)
    engine.teacher_force(tokens(model, (1, 6), 4), tokens(model, (1, 3), 5), [cache])
    cache.crop(8)  # nothing dropped
    with pytest.raises(NotImplementedError, match="cannot crop layer 0 from 8 to 7 tokens"):
        cache.crop(-1)
    packed_engine = runner(tiny_dirs["llama"], "tq_packed")
    packed = packed_engine.model
    ids = torch.from_numpy(tokens(packed, (2, 6), 6))
    mask = torch.ones(ids.shape, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded sequence
    with pytest.raises(NotImplementedError, match="cannot mask cached tokens"):
        packed.generate(
            ids, attention_mask=mask, past_key_values=TurboQuantCache(packed.config), max_new_tokens=3
        )
    baseline = packed_engine.new_cache(CacheConfig(key_strategy="kivi", key_bits=2))
    with pytest.raises(NotImplementedError, match="key strategy 'kivi'"):
        packed_engine.teacher_force(tokens(packed, (1, 6), 7), tokens(packed, (1, 3), 8), [baseline])
    renormalized = packed_engine.new_cache(CacheConfig(key_strategy="prod", key_bits=3, renormalize=True))
    with pytest.raises(NotImplementedError, match="renormalize=True with key strategy 'prod'"):
        packed_engine.teacher_force(tokens(packed, (1, 6), 7), tokens(packed, (1, 3), 8), [renormalized])
    misused = TurboQuantCache(model.config, keep_reconstruction=False)  # with sdpa attention
    with pytest.raises(RuntimeError, match='attn_implementation="tq_packed"'):
        engine.teacher_force(tokens(model, (1, 6), 9), tokens(model, (1, 3), 10), [misused])
    with pytest.raises(ValueError, match="attention must be one of"):
        runner(tiny_dirs["llama"], "eager")


def test_smollm2_eight_bit_generation_equals_exact(smollm2_checkpoint):
    from transformers import AutoTokenizer

    model = load(smollm2_checkpoint)
    text = "Explain why the sky looks blue at noon but red at sunset."
    ids = AutoTokenizer.from_pretrained(smollm2_checkpoint)(text, return_tensors="np")["input_ids"]
    expected = greedy(model, ids, DynamicCache(config=model.config))
    eight_bits = TurboQuantCache(model.config, CacheConfig(key_bits=8, value_bits=8))
    assert np.array_equal(greedy(model, ids, eight_bits), expected)


def first_code_difference(caches: list, others: list) -> int | None:
    """The first position whose stored codes differ between two lists of per-sequence caches
    (rows of one teacher-forced batch), over every layer, stream and channel group."""
    first = None
    for cache, other in zip(caches, others, strict=True):
        for layer, twin in zip(cache.layers, other.layers, strict=True):
            (batch, row), (twin_batch, _) = layer.joined, twin.joined
            for stream, twin_stream in zip(batch.streams, twin_batch.streams, strict=True):
                for group, twin_group in zip(stream.groups, twin_stream.groups, strict=True):
                    held = min(stream.quantized, twin_stream.quantized)
                    codes, twin_codes = (g.stored["codes"][row, :, :held] for g in (group, twin_group))
                    differs = (codes != twin_codes).any(dim=(0, 2))
                    positions = torch.nonzero(differs)
                    if len(positions):
                        position = int(positions[0])
                        first = position if first is None else min(first, position)
    return first


def test_smollm2_packed_attention_and_the_onnx_loop(smollm2_checkpoint, smollm2_bundle):
    """Two 192-token windows of the Wikipedia corpus (context 128, 64 decoded steps), 3-bit MSE:
    the packed path's logits equal the reconstruct path's while both runs hold the same codes
    (at least 16 steps); with exact-strategy caches the
    transformers path equals the ONNX Runtime loop (tq.engines.onnx) within LOGIT_TOLERANCE; with the
    3-bit cache their per-token NLLs are statistically indistinguishable (AGREEMENT_SE)."""
    from tq.engines.onnx import OnnxRunner
    from tq.models.bundle import ModelBundle
    from tq.tasks.perplexity import text_windows
    from tq.tasks.stats import mean_se

    bundle = ModelBundle.load(smollm2_bundle)
    rows, _ = text_windows(bundle, 2, 192, sample_seed=0)
    prompts, forced = rows[:, :128], rows[:, 128:]
    onnx_runner = OnnxRunner(bundle)
    config = CacheConfig(key_bits=3, value_bits=3)
    logits, caches = {}, {}
    for attention in ("sdpa", "tq_packed"):
        engine = runner(smollm2_checkpoint, attention)
        caches[attention] = [engine.new_cache(config) for _ in rows]
        logits[attention] = engine.teacher_force(prompts, forced, caches[attention])
    # Step s attends to the codes of positions < 127 + s; once a code differs between the runs
    # (a key that differs by ~1e-6 falls on the other side of a cell edge) they are two
    # realizations, compared statistically below like the ONNX loop.
    flip = first_code_difference(caches["sdpa"], caches["tq_packed"])
    agreeing = forced.shape[1] if flip is None else flip - 127 + 1
    assert agreeing >= 16, f"the runs' codes differ from position {flip}"
    assert_logits_close(logits["tq_packed"][:, :agreeing], logits["sdpa"][:, :agreeing])
    exact = engine.teacher_force(prompts, forced, [engine.new_cache(EXACT) for _ in rows])
    assert_logits_close(
        exact, onnx_runner.teacher_force(prompts, forced, [onnx_runner.new_cache(EXACT) for _ in rows])
    )
    onnx = onnx_runner.teacher_force(prompts, forced, [onnx_runner.new_cache(config) for _ in rows])

    def nll(values: np.ndarray) -> np.ndarray:
        values = values.astype(np.float64)
        top = values.max(axis=-1, keepdims=True)
        log_norm = (top + np.log(np.exp(values - top).sum(axis=-1, keepdims=True)))[..., 0]
        return log_norm - np.take_along_axis(values, forced[..., None], axis=-1)[..., 0]

    mean, se = mean_se((nll(logits["sdpa"]) - nll(onnx)).ravel())
    assert abs(mean) <= AGREEMENT_SE * se, (mean, se)


def test_bfloat16_models_keep_their_dtype_on_both_paths(tiny_dirs):
    """A bfloat16 model's cache holds its exact tokens and reconstruction in bfloat16; the packed
    path (float32 attention, its output rounded to bfloat16) departs from the reconstruct path
    (bfloat16 SDPA) by less than bfloat16 departs from float32 on the same path (the tiny
    model amplifies every rounding: random weights)."""
    logits = {}
    for dtype, attention in (("float32", "sdpa"), ("bfloat16", "sdpa"), ("bfloat16", "tq_packed")):
        engine = TransformersRunner(Checkpoint.load(tiny_dirs["llama"]), dtype=dtype, attention=attention)
        prompts, forced = tokens(engine.model, (2, 10), 12), tokens(engine.model, (2, 8), 13)
        caches = [engine.new_cache(CacheConfig(key_bits=4, value_bits=3, residual_length=2)) for _ in prompts]
        logits[dtype, attention] = engine.teacher_force(prompts, forced, caches)
        batch = caches[0].layers[0].joined[0]
        if dtype == "bfloat16":
            for stream in batch.streams:
                assert stream.buffer.dtype == torch.bfloat16 and stream.exact(0).shape[2] >= 2
            assert batch.keys.dtype == torch.bfloat16
    reference = logits["bfloat16", "sdpa"]
    paths = np.abs(logits["bfloat16", "tq_packed"] - reference).max()
    dtypes = np.abs(logits["float32", "sdpa"] - reference).max()
    assert 0 < paths < dtypes, (paths, dtypes)


def test_a_decode_step_moves_no_cache_bytes_between_host_and_device(tiny_dirs):
    """Every way a tensor's data can reach the host, or a host array a tensor, is counted inside
    the cache's update and attend during a decode step (tq.engines.transfers): with validation
    one flag per layer (1 byte), else nothing, on both paths. (The first quantization uploads the
    codecs' matrices, once per process and configuration.)"""
    for attention in ("sdpa", "tq_packed"):
        model = load(tiny_dirs["llama"], attention)
        ids = torch.from_numpy(tokens(model, (2, 7), 14))
        for validate in (True, False):
            config = CacheConfig(key_bits=3, value_bits=2.5)
            cache = TurboQuantCache(model.config, config, validate=validate, packed_kernels="torch")
            with torch.inference_mode():
                model(input_ids=ids, past_key_values=cache, use_cache=True)
                model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)  # quantizes the prompt
                with HostTransfers() as moved:
                    model(input_ids=ids[:, 1:2], past_key_values=cache, use_cache=True)
            expected = [("__bool__", 1)] * len(cache.layers) if validate else []
            assert moved.records == expected, (attention, validate, moved.records)


def test_a_reset_cache_runs_again_and_a_joined_row_refuses_calls(tiny_dirs):
    """reset() empties every layer and the cache takes a new prompt; a cache joined into a batch
    reads as its row and refuses calls of its own."""
    model = load(tiny_dirs["llama"])
    ids = torch.from_numpy(tokens(model, (1, 6), 15))
    cache = TurboQuantCache(model.config, CacheConfig(key_bits=3, value_bits=3))
    with torch.inference_mode():
        first = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        cache.reset()
        assert cache.get_seq_length() == 0 and cache.nbytes == 0
        again = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        assert torch.equal(first, again)
        other = TurboQuantCache(model.config, CacheConfig(key_bits=3, value_bits=3))
        model(input_ids=ids, past_key_values=other, use_cache=True)
        joined = TurboQuantCache.concatenate([cache, other])
        assert joined.get_seq_length() == cache.get_seq_length() == 6
        assert joined.nbytes == cache.nbytes + other.nbytes
        with pytest.raises(RuntimeError, match="joined into a batch"):
            model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)


def test_a_one_token_prompt_on_the_packed_path(tiny_dirs):
    """A first call of one token has nothing cached to read: it attends with SDPA, then the
    packed steps follow (exact caches: the tokens of transformers' DynamicCache)."""
    model = load(tiny_dirs["llama"], "tq_packed")
    ids = tokens(model, (1, 1), 16)
    expected = greedy(model, ids, DynamicCache(config=model.config), 6)
    assert np.array_equal(greedy(model, ids, TurboQuantCache(model.config, EXACT), 6), expected)
