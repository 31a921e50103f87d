"""Baseline quantizers (tq.quant.uniform) and the cache strategies built on them.

Tolerances: a uniform quantizer reconstructs each coordinate within half its stored (float16)
scale; the only other error is one float32 rounding of zero + code * scale (relative 2^-24),
so the bound checked is scale / 2 + 1e-6 * (1 + |x|).
"""

from __future__ import annotations

import numpy as np
import pytest

from tq.cache.config import CacheConfig, exact_layers
from tq.cache.kvcache import MultiHeadKVCache, QuantizedKVCache
from tq.cache.strategies import STRATEGIES
from tq.core.rotation import make_rotation
from tq.engines.onnx import OnnxRunner
from tq.quant.uniform import MAX_ABS, BatchUniform, UniformQuantizer

HEADS, DIM = 2, 64


def _gaussian(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _tokens(seed: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    keys = _gaussian(seed, (HEADS, t, DIM), 2.0)
    keys[:, :, :4] *= 8  # outlier channels, as real keys have
    return keys, _gaussian(seed + 1000, (HEADS, t, DIM))


def _per_coordinate(quantizer: UniformQuantizer, params: np.ndarray) -> np.ndarray:
    return quantizer._expand(params.astype(np.float64))


# ---------------------------------------------------------------- the quantizer


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize(
    ("axis", "dim", "group_size"), [("token", 64, 32), ("token", 40, 16), ("channel", 48, 8)]
)
def test_uniform_error_is_within_half_a_stored_step(bits, axis, dim, group_size):
    x = _gaussian(bits, (64, dim), 3.0)
    quantizer = UniformQuantizer(dim, bits, group_size, axis)
    batch = quantizer.quantize(x)
    error = np.abs(quantizer.dequantize(batch).astype(np.float64) - x)
    scale = _per_coordinate(quantizer, batch.scales)
    assert np.all(error <= scale / 2 + 1e-6 * (1 + np.abs(x)))
    # the float16 zero point and scale cover each group's range: no code is ever clamped
    zero = _per_coordinate(quantizer, batch.zeros)
    assert np.all(zero <= x)
    assert np.all(zero + (2**bits - 1) * scale >= x)
    # and the zero point is the largest float16 at or below the group's minimum
    if axis == "token":
        low = np.minimum.reduceat(x, np.arange(0, dim, group_size), axis=1)
    else:
        low = x.reshape(-1, group_size, dim).min(axis=1)
    assert np.all(np.nextafter(batch.zeros, np.float16(np.inf)).astype(np.float32) > low)


@pytest.mark.parametrize(("axis", "rotated"), [("token", False), ("channel", False), ("token", True)])
def test_error_shrinks_with_bits(axis, rotated):
    x = _gaussian(1, (256, DIM))
    rotation = make_rotation(DIM, 0) if rotated else None
    errors = []
    for bits in (2, 3, 4):
        quantizer = UniformQuantizer(DIM, bits, 32, axis, rotation)
        errors.append(np.mean((quantizer.dequantize(quantizer.quantize(x)) - x) ** 2))
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] < errors[0] / 3 and errors[2] < errors[1] / 3  # about 4x per bit


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_constant_groups_round_trip_exactly(axis):
    x = _gaussian(2, (16, DIM))
    if axis == "channel":
        x[:, 10] = 0.75  # a constant channel
    else:
        x[3], x[5], x[7] = 0.0, 1.5, -3.25  # constant rows
    x[8:16, 32:] = 2.0**-20  # a tiny constant, a float16 subnormal
    quantizer = UniformQuantizer(DIM, 2, 8 if axis == "channel" else 32, axis)
    batch = quantizer.quantize(x)
    out = quantizer.dequantize(batch)
    constant = {
        "token": [(3, slice(None)), (5, slice(None)), (7, slice(None)), (slice(8, 16), slice(32, None))]
    }
    constant["channel"] = [(slice(None), 10), (slice(8, 16), slice(32, None))]
    for index in constant[axis]:
        np.testing.assert_array_equal(out[index], x[index])
    assert np.any(batch.scales == 0)


def test_a_constant_that_float16_cannot_hold_is_within_one_float16_step():
    x = np.full((2, DIM), 0.1, np.float32)
    quantizer = UniformQuantizer(DIM, 4, 32)
    out = quantizer.dequantize(quantizer.quantize(x))
    assert np.max(np.abs(out - x)) <= 0.1 * 2**-10


def test_rotation_beats_plain_uniform_on_an_outlier_channel():
    """An outlier channel (20x) stretches its group's range; the rotation spreads it over all
    channels. (A single far larger outlier favours plain min/max groups instead: the other
    channels then all sit at code 0, within their own small spread of the zero point.)"""
    x = _gaussian(3, (512, DIM))
    x[:, 5] *= 20
    errors = {}
    for name, rotation in (("plain", None), ("rotated", make_rotation(DIM, 0))):
        quantizer = UniformQuantizer(DIM, 3, 32, "token", rotation)
        errors[name] = np.sum((quantizer.dequantize(quantizer.quantize(x)) - x) ** 2) / np.sum(x**2)
    assert errors["rotated"] < 0.7 * errors["plain"]


def test_hadamard_rotation_is_undone():
    x = _gaussian(4, (32, DIM))
    quantizer = UniformQuantizer(DIM, 8, 32, rotation=make_rotation(DIM, 1, "hadamard"))
    np.testing.assert_allclose(quantizer.dequantize(quantizer.quantize(x)), x, atol=0.05)


def test_batch_bytes_and_row_slices():
    x = _gaussian(5, (48, 40))
    token = UniformQuantizer(40, 3, 16).quantize(x)
    assert token.zeros.shape == token.scales.shape == (48, 3)  # groups of 16, 16 and 8 channels
    assert token.nbytes == 48 * (15 + 3 * 2 * 2)
    assert len(token.rows(5, 9)) == 4 and token.rows(5, 9).zeros.shape == (4, 3)
    channel = UniformQuantizer(40, 3, 16, "channel").quantize(x)
    assert channel.zeros.shape == (3, 40)
    assert channel.nbytes == 48 * 15 + 3 * 40 * 2 * 2
    assert channel.rows(16, 48).zeros.shape == (2, 40)
    with pytest.raises(ValueError, match=r"rows 8..48 do not fall on group bounds \(group_size 16\)"):
        channel.rows(8, 48)
    assert token.norms is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dim": 1}, ValueError, "dim must be an integer >= 2, got 1"),
        ({"bits": 0}, ValueError, r"whole number of bits in \[1, 8\], got 0"),
        ({"bits": 9}, ValueError, r"whole number of bits in \[1, 8\], got 9"),
        ({"bits": 2.5}, ValueError, r"whole number of bits in \[1, 8\], got 2.5"),
        ({"bits": "4"}, TypeError, "bits must be a number"),
        ({"group_size": 1}, ValueError, "group_size must be >= 2, got 1"),
        ({"group_size": 8.0}, TypeError, "group_size must be an integer, got 8.0"),
        ({"axis": "head"}, ValueError, "axis must be one of"),
        ({"rotation": make_rotation(32, 0)}, ValueError, "the rotation is 32-dimensional, but dim is 64"),
    ],
)
def test_bad_quantizer_settings_are_named(kwargs, error, match):
    settings = {"dim": DIM, "bits": 4, "group_size": 32, "axis": "token", **kwargs}
    with pytest.raises(error, match=match):
        UniformQuantizer(**settings)


def test_bad_quantizer_input_is_named():
    quantizer = UniformQuantizer(DIM, 4, 8, "channel")
    with pytest.raises(ValueError, match="n = 12 is not a multiple of group_size 8"):
        quantizer.quantize(_gaussian(6, (12, DIM)))
    with pytest.raises(ValueError, match=r"must have shape \[n, 64\], got \[8, 63\]"):
        quantizer.quantize(_gaussian(6, (8, DIM - 1)))
    with pytest.raises(TypeError, match="float32 or float64"):
        quantizer.quantize(np.zeros((8, DIM), np.int32))
    x = _gaussian(6, (8, DIM))
    x[3, 2] = np.inf
    with pytest.raises(ValueError, match="x row 3 contains NaN or inf"):
        quantizer.quantize(x)
    x[3, 2] = 2 * MAX_ABS
    with pytest.raises(ValueError, match="x row 3 reaches 32768, beyond 16384"):
        quantizer.quantize(x)
    other = UniformQuantizer(DIM, 3, 8, "channel").quantize(_gaussian(6, (8, DIM)))
    with pytest.raises(ValueError, match=r"bits=3 \(quantizer 4\)"):
        quantizer.dequantize(other)


def _batch(**changes) -> BatchUniform:
    good = UniformQuantizer(DIM, 3, 32).quantize(_gaussian(7, (4, DIM)))
    fields = {name: getattr(good, name) for name in ("dim", "bits", "group_size", "axis", "codes", "zeros")}
    return BatchUniform(**{**fields, "scales": good.scales, **changes})


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"zeros": np.zeros((4, 2), np.float32)}, TypeError, "zeros must be a float16 array"),
        ({"scales": np.zeros((4, 3), np.float16)}, ValueError, r"scales must have shape \[4, 2\]"),
        ({"scales": np.full((4, 2), -1, np.float16)}, ValueError, "scales has a negative value"),
        ({"zeros": np.full((4, 2), np.inf, np.float16)}, ValueError, "zeros has a value that is not finite"),
        ({"codes": np.zeros((4, 23), np.uint8)}, ValueError, r"codes must have shape \[n, 24\]"),
        ({"axis": "channel"}, ValueError, "4 rows is not a multiple of group_size 32"),
        ({"bits": 3.0}, TypeError, "bits must be an integer"),
    ],
)
def test_inconsistent_batches_are_named(changes, error, match):
    with pytest.raises(error, match=match):
        _batch(**changes)


# ---------------------------------------------------------------- the cache strategies


def _stream_quantizer(strategy: str, part: str, seed: int = 0, rotation: str = "haar") -> UniformQuantizer:
    config = CacheConfig(key_bits=2, value_bits=2, group_size=32, rotation=rotation)
    return STRATEGIES[strategy].single_quantizer(part, DIM, 2, seed, config)


def test_strategies_pick_their_axis_and_rotation():
    kivi_keys = _stream_quantizer("kivi", "key")
    assert kivi_keys.axis == "channel" and kivi_keys.rotation is None and kivi_keys.rows_per_group == 32
    assert _stream_quantizer("kivi", "value", seed=1).axis == "token"
    rotated = _stream_quantizer("rotated-uniform", "key", rotation="hadamard")
    assert rotated.axis == "token" and rotated.rotation.kind == "hadamard"
    assert _stream_quantizer("uniform", "key").rotation is None


@pytest.mark.parametrize("residual", [0, 5])
def test_kivi_keys_leave_the_window_in_whole_groups(residual):
    group = 8
    config = CacheConfig(
        key_strategy="kivi",
        value_strategy="kivi",
        key_bits=2,
        value_bits=2,
        group_size=group,
        residual_length=residual,
    )
    cache = QuantizedKVCache(HEADS, DIM, config)
    keys, values = _tokens(8, 40)
    for t in range(40):
        cache.append(keys[:, t : t + 1], values[:, t : t + 1])
        length = t + 1
        key_quantized = max(0, (length - residual) // group * group)
        value_quantized = max(0, length - residual)
        assert cache._keys.quantized == key_quantized
        assert cache._values.quantized == value_quantized
        assert cache.quantized_tokens == min(key_quantized, value_quantized)
        assert min(length, residual) <= length - key_quantized <= residual + group - 1
    # the exact parts are the input; everything older is quantized (at 2 bits nothing is exact)
    np.testing.assert_array_equal(cache.keys()[:, key_quantized:], keys[:, key_quantized:])
    np.testing.assert_array_equal(cache.values()[:, value_quantized:], values[:, value_quantized:])
    assert np.all(np.any(cache.keys()[:, :key_quantized] != keys[:, :key_quantized], axis=2))


@pytest.mark.parametrize("strategy", ["uniform", "kivi", "rotated-uniform"])
@pytest.mark.parametrize("chunks", [[1] * 37, [13, 1, 20, 3], [5, 32]])
def test_arrival_order_does_not_change_the_reconstruction(strategy, chunks):
    config = CacheConfig(
        key_strategy=strategy,
        value_strategy=strategy,
        key_bits=3,
        value_bits=2,
        residual_length=3,
        group_size=8,
    )
    keys, values = _tokens(9, 37)
    reference = QuantizedKVCache(HEADS, DIM, config)
    reference.append(keys, values)
    cache = QuantizedKVCache(HEADS, DIM, config)
    start = 0
    for size in chunks:
        cache.append(keys[:, start : start + size], values[:, start : start + size])
        start += size
    assert cache._keys.quantized == reference._keys.quantized
    if strategy == "rotated-uniform":  # BLAS may round products of other batch sizes differently
        np.testing.assert_allclose(cache.keys(), reference.keys(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cache.values(), reference.values(), rtol=1e-5, atol=1e-5)
    else:  # elementwise arithmetic: bit for bit
        np.testing.assert_array_equal(cache.keys(), reference.keys())
        np.testing.assert_array_equal(cache.values(), reference.values())
    assert cache.nbytes == reference.nbytes
    stored_keys, stored_values = cache.dequantize_stored()
    np.testing.assert_array_equal(stored_keys, cache.keys()[:, : cache._keys.quantized])
    np.testing.assert_array_equal(stored_values, cache.values()[:, : cache._values.quantized])


@pytest.mark.parametrize("strategy", ["uniform", "rotated-uniform", "kivi"])
@pytest.mark.parametrize(("bits", "group_size"), [(2, 32), (4, 16), (1, 64), (3, 8)])
def test_stored_bits_are_bits_plus_32_over_group_size(strategy, bits, group_size):
    config = CacheConfig(
        key_strategy=strategy, value_strategy=strategy, key_bits=bits, value_bits=bits, group_size=group_size
    )
    cache = QuantizedKVCache(HEADS, DIM, config)
    cache.append(*_tokens(10, 128))  # whole groups of tokens, nothing left exact
    assert cache.quantized_tokens == 128
    stored = cache.bits_per_coordinate()
    assert stored["key_code_bits"] == stored["value_code_bits"] == bits
    assert stored["key_stored_bits"] == stored["value_stored_bits"] == bits + 32 / group_size
    assert cache.nbytes == 2 * HEADS * 128 * DIM * (bits + 32 / group_size) / 8


def test_exact_window_tokens_count_as_fp32_and_short_groups_count_their_scales():
    config = CacheConfig(
        key_strategy="kivi", value_strategy="uniform", key_bits=2, value_bits=4, group_size=32
    )
    cache = QuantizedKVCache(HEADS, 48, config)
    cache.append(*(part[:, :, :48] for part in _tokens(11, 40)))
    # keys: 32 tokens per channel group + 8 exact; values: 40 tokens, channel groups of 32 and 16
    key_bytes = HEADS * (32 * 48 * 2 // 8 + 48 * 4 + 8 * 48 * 4)
    value_bytes = HEADS * 40 * (48 * 4 // 8 + 2 * 4)
    assert cache._keys.nbytes == key_bytes
    assert cache._values.nbytes == value_bytes


def test_renormalize_and_norm_dtype_do_not_apply_to_baselines():
    keys, values = _tokens(12, 16)
    keys[0, 3] = 10000.0  # a norm of 80000: beyond float16, but every value fits
    plain = QuantizedKVCache(
        HEADS, DIM, CacheConfig(key_strategy="uniform", value_strategy="kivi", group_size=8)
    )
    other = CacheConfig(
        key_strategy="uniform", value_strategy="kivi", group_size=8, renormalize=True, norm_dtype="float16"
    )
    tuned = QuantizedKVCache(HEADS, DIM, other)
    plain.append(keys, values)
    tuned.append(keys, values)
    np.testing.assert_array_equal(tuned.keys(), plain.keys())
    np.testing.assert_array_equal(tuned.values(), plain.values())
    assert tuned.nbytes == plain.nbytes


def test_values_beyond_the_float16_range_are_refused_before_anything_is_stored():
    keys, values = _tokens(13, 4)
    values[1, 2, 7] = -20000.0
    cache = QuantizedKVCache(HEADS, DIM, CacheConfig(value_strategy="uniform"))
    with pytest.raises(ValueError, match=r"values: a value of 20000 \(head 1, new token 2\) is beyond 16384"):
        cache.append(keys, values)
    assert len(cache) == 0
    keys[0, 1] = 3000.0  # norm 24000: too large for a rotated group, though every value fits
    rotated = QuantizedKVCache(HEADS, DIM, CacheConfig(key_strategy="rotated-uniform"))
    with pytest.raises(ValueError, match=r"keys: a vector norm of 24000 \(head 0, new token 1\)"):
        rotated.append(keys, values * 0)
    assert len(rotated) == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"group_size": 1}, ValueError, "group_size must be >= 2, got 1"),
        ({"group_size": 0}, ValueError, "group_size must be >= 2, got 0"),
        ({"group_size": 32.0}, TypeError, "group_size must be an integer, got 32.0"),
        ({"group_size": True}, TypeError, "group_size must be an integer, got True"),
        ({"key_strategy": "kivi", "key_bits": 2.5}, ValueError, "key_bits must be a whole number for kivi"),
        (
            {"value_strategy": "uniform", "value_bits": 3.5},
            ValueError,
            "value_bits must be a whole number for uniform",
        ),
        (
            {"key_strategy": "rotated-uniform", "key_bits": 1.25},
            ValueError,
            "key_bits must be a whole number for rotated-uniform",
        ),
        (
            {"key_strategy": "kivi", "key_bits": 0},
            ValueError,
            r"key_bits must be in \[1, 8\] for kivi, got 0",
        ),
        ({"value_strategy": "uniform", "value_bits": 9}, ValueError, r"value_bits must be in \[1, 8\]"),
        ({"key_strategy": "KIVI"}, ValueError, "key_strategy must be one of"),
    ],
)
def test_bad_baseline_configs_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        CacheConfig(**kwargs)


def test_whole_float_widths_are_accepted():
    cache = QuantizedKVCache(
        HEADS, DIM, CacheConfig(key_strategy="kivi", value_strategy="uniform", key_bits=2.0, group_size=4)
    )
    cache.append(*_tokens(14, 8))
    assert cache.bits_per_coordinate()["key_code_bits"] == 2


def test_hadamard_needs_a_power_of_two_head_dim_and_says_so_at_construction():
    with pytest.raises(ValueError, match="power-of-two dimension, got 48"):
        QuantizedKVCache(HEADS, 48, CacheConfig(key_strategy="rotated-uniform", rotation="hadamard"))


def test_append_all_with_kivi_keys_and_uniform_values_equals_appending_layer_by_layer():
    config = CacheConfig(
        key_strategy="kivi",
        value_strategy="uniform",
        key_bits=2,
        value_bits=3,
        residual_length=2,
        group_size=4,
    )
    overrides = exact_layers(4, last=1)
    one_by_one = MultiHeadKVCache(4, HEADS, DIM, config, overrides)
    together = MultiHeadKVCache(4, HEADS, DIM, config, overrides)
    for step, t in enumerate([9, 1, 1, 3, 1, 5]):
        keys, values = _tokens(40 + step, t)
        layer_keys = [keys * (layer + 1) for layer in range(4)]
        for layer in range(4):
            one_by_one.append(layer, layer_keys[layer], values)
        together.append_all(layer_keys, [values] * 4)
    for layer in range(4):
        np.testing.assert_array_equal(together[layer].keys(), one_by_one[layer].keys())
        np.testing.assert_array_equal(together[layer].values(), one_by_one[layer].values())
        stored_keys, stored_values = together[layer].dequantize_stored()
        np.testing.assert_array_equal(stored_keys, together[layer].keys()[:, : stored_keys.shape[1]])
        np.testing.assert_array_equal(stored_values, together[layer].values()[:, : stored_values.shape[1]])
    assert together[0]._keys.quantized == 16 and together[0]._values.quantized == 18  # 20 tokens
    assert together.nbytes == one_by_one.nbytes
    summary = together.summary()
    assert summary[0]["key"] == "kivi@2" and summary[0]["value"] == "uniform@3"
    assert summary[3]["nbytes"] == summary[3]["float_nbytes"]


def test_quantize_presents_patches_every_position_a_kivi_flush_changes():
    """The runner rewrites positions from min(quantized_tokens, past) on: a whole key group that
    leaves the window at once must be among them."""
    config = CacheConfig(
        key_strategy="kivi", value_strategy="kivi", key_bits=2, residual_length=1, group_size=4
    )
    cache = MultiHeadKVCache(2, HEADS, 16, config)
    rng = np.random.default_rng(15)
    past, past_len = None, 0
    for t in (3, 1, 1, 1, 2, 1, 1):
        presents = []
        for layer in range(2):
            new = [rng.standard_normal((1, HEADS, t, 16)).astype(np.float32) for _ in range(2)]
            if past is not None:  # the graph returns the past it was given, then the new positions
                new = [
                    np.concatenate([old, part], axis=2) for old, part in zip(past[layer], new, strict=True)
                ]
            presents.append(tuple(new))
        past = OnnxRunner.quantize_presents(cache, presents, past_len)
        past_len += t
        for layer, (key, value) in zip(cache.layers, past, strict=True):
            np.testing.assert_array_equal(key[0], layer.keys())
            np.testing.assert_array_equal(value[0], layer.values())
    assert cache[0]._keys.quantized == 8 and cache[0]._values.quantized == 9  # 10 tokens


@pytest.fixture(scope="module")
def tiny_llama_bundle(tmp_path_factory):
    """The session's shared tiny-llama bundle (read only): 2 layers, 2 KV heads, head_dim 16."""
    pytest.importorskip("onnxruntime")
    from tests.models_fixtures import tiny_bundle

    return tiny_bundle(tmp_path_factory.getbasetemp(), "tiny-llama")


def test_runner_decodes_with_kivi_keys_and_rotated_uniform_values(tiny_llama_bundle):
    from tq.models.bundle import ModelBundle

    bundle = ModelBundle.load(tiny_llama_bundle)
    runner = OnnxRunner(bundle)
    ids = bundle.encode("the quick brown fox jumps over the lazy dog")
    config = CacheConfig(
        key_strategy="kivi",
        value_strategy="rotated-uniform",
        key_bits=2,
        value_bits=4,
        residual_length=2,
        group_size=4,
    )
    cache = runner.new_cache(config)
    _, past = runner.prefill(ids, cache)
    for token in (4, 5, 6, 7, 8):
        _, past = runner.extend([token], past, cache)
        for layer, (key, value) in zip(cache.layers, past, strict=True):
            np.testing.assert_array_equal(key[0], layer.keys())
            np.testing.assert_array_equal(value[0], layer.values())
    length = len(ids) + 5
    assert len(cache[0]) == length
    assert cache[0]._keys.quantized == (length - 2) // 4 * 4
    assert cache[0]._values.quantized == length - 2
    run = runner.generate(ids, 6, cache=runner.new_cache(config), stop_at_eos=False)
    assert len(run.tokens) == 6 and np.all(np.isfinite(run.logits))
    assert run.kv_nbytes < run.kv_float_nbytes
