"""Quantized KV caches: growth stability, bit accounting, windows, options and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tq.cache.config import CacheConfig, exact_layers, split_widths
from tq.cache.kvcache import MultiHeadKVCache, QuantizedKVCache, append_each

HEADS, DIM = 3, 64

CONFIGS = {
    "mse4": CacheConfig(),
    "prod3": CacheConfig(key_strategy="prod", key_bits=3, value_bits=2),
    "fractional": CacheConfig(key_bits=2.5, value_bits=3.5),
    "window": CacheConfig(key_bits=3, value_bits=3, residual_length=7),
    "fp16-renorm": CacheConfig(norm_dtype="float16", renormalize=True),
    "hadamard": CacheConfig(rotation="hadamard", key_bits=2),
    # baselines (tq.quant.uniform); kivi keys leave the window in whole groups of 8 tokens
    "kivi": CacheConfig(
        key_strategy="kivi", value_strategy="kivi", key_bits=2, residual_length=5, group_size=8
    ),
    "uniform": CacheConfig(key_strategy="uniform", value_strategy="uniform", key_bits=3, group_size=16),
    "rotated-uniform": CacheConfig(
        key_strategy="rotated-uniform", value_strategy="mse", key_bits=2, rotation="hadamard"
    ),
}


def _tokens(seed: int, t: int, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((HEADS, t, DIM)).astype(np.float32) * scale
    keys[:, :, :4] *= 8  # a few outlier channels, as real keys have
    return keys, rng.standard_normal((HEADS, t, DIM)).astype(np.float32)


def _fill(cache: QuantizedKVCache, keys: np.ndarray, values: np.ndarray, chunks: list[int]) -> None:
    start = 0
    for size in chunks:
        cache.append(keys[:, start : start + size], values[:, start : start + size])
        start += size
    assert start == keys.shape[1]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_earlier_tokens_never_change_as_the_cache_grows(name):
    config = CONFIGS[name]
    cache = QuantizedKVCache(HEADS, DIM, config)
    keys, values = _tokens(1, 60)
    cache.append(keys[:, :20], values[:, :20])
    settled = cache.quantized_tokens
    first_keys, first_values = cache.keys()[:, :settled].copy(), cache.values()[:, :settled].copy()
    for step in range(20, 60):
        cache.append(keys[:, step : step + 1], values[:, step : step + 1])
        np.testing.assert_array_equal(cache.keys()[:, :settled], first_keys)
        np.testing.assert_array_equal(cache.values()[:, :settled], first_values)
    assert len(cache) == 60
    # the working reconstruction is exactly what the stored codes give
    # (each stream's own quantized part: kivi keys leave the window in groups, behind the values)
    stored_keys, stored_values = cache.dequantize_stored()
    assert min(stored_keys.shape[1], stored_values.shape[1]) == cache.quantized_tokens
    np.testing.assert_array_equal(stored_keys, cache.keys()[:, : stored_keys.shape[1]])
    np.testing.assert_array_equal(stored_values, cache.values()[:, : stored_values.shape[1]])


@pytest.mark.parametrize("chunks", [[50], [1] * 50, [13, 1, 20, 16]])
def test_integer_widths_do_not_depend_on_how_tokens_arrive(chunks):
    keys, values = _tokens(2, 50)
    reference = QuantizedKVCache(HEADS, DIM, CONFIGS["window"])
    _fill(reference, keys, values, [50])
    cache = QuantizedKVCache(HEADS, DIM, CONFIGS["window"])
    _fill(cache, keys, values, chunks)
    # Same codes; BLAS may round the products of different batch sizes differently.
    np.testing.assert_allclose(cache.keys(), reference.keys(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache.values(), reference.values(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("residual", [0, 1, 7, 50, 80])
def test_residual_window_keeps_the_most_recent_tokens_exact(residual):
    keys, values = _tokens(3, 50)
    cache = QuantizedKVCache(HEADS, DIM, CacheConfig(key_bits=2, value_bits=2, residual_length=residual))
    _fill(cache, keys, values, [10, 1, 1, 38])
    quantized = max(0, 50 - residual)
    assert cache.quantized_tokens == quantized
    np.testing.assert_array_equal(cache.keys()[:, quantized:], keys[:, quantized:])
    np.testing.assert_array_equal(cache.values()[:, quantized:], values[:, quantized:])
    # every token before the window is quantized: at 2 bits no reconstruction is exact
    differs = np.any(cache.keys()[:, :quantized] != keys[:, :quantized], axis=2)
    assert differs.all()


def test_exact_strategy_returns_the_input_bit_for_bit():
    keys, values = _tokens(4, 30)
    cache = QuantizedKVCache(HEADS, DIM, CacheConfig(key_strategy="exact", value_strategy="exact"))
    _fill(cache, keys, values, [5, 25])
    np.testing.assert_array_equal(cache.keys(), keys)
    np.testing.assert_array_equal(cache.values(), values)
    assert cache.nbytes == cache.float_nbytes == 2 * HEADS * 30 * DIM * 4


def _expected_stream_bytes(bits: float, strategy: str, tokens: int, norm_bytes: int = 4) -> int:
    """Bytes per stream from first principles: codes at exactly their width, plus norms."""
    groups = split_widths(bits, DIM)
    per_vector = 0
    for group_bits, size in groups:
        code_bits = group_bits - 1 if strategy == "prod" else group_bits
        per_vector += math.ceil(size * code_bits / 8) + norm_bytes
        if strategy == "prod":
            per_vector += math.ceil(size / 8) + 4  # sign bits and gamma
    channel_indices = HEADS * DIM * 2 if len(groups) > 1 else 0
    return tokens * HEADS * per_vector + channel_indices


@pytest.mark.parametrize(
    ("key_bits", "key_strategy", "value_bits", "norm_dtype"),
    [
        (4, "mse", 2, "float32"),
        (3, "prod", 1, "float32"),
        (2.5, "mse", 3.5, "float32"),
        (3, "mse", 4, "float16"),
    ],
)
def test_bit_accounting(key_bits, key_strategy, value_bits, norm_dtype):
    config = CacheConfig(
        key_bits=key_bits, key_strategy=key_strategy, value_bits=value_bits, norm_dtype=norm_dtype
    )
    cache = QuantizedKVCache(HEADS, DIM, config)
    keys, values = _tokens(5, 24)
    _fill(cache, keys, values, [16, 8])
    norm_bytes = 2 if norm_dtype == "float16" else 4
    expected = _expected_stream_bytes(key_bits, key_strategy, 24, norm_bytes) + _expected_stream_bytes(
        value_bits, "mse", 24, norm_bytes
    )
    assert cache.nbytes == expected
    bits = cache.bits_per_coordinate()
    assert bits["key_code_bits"] == key_bits
    assert bits["value_code_bits"] == value_bits
    assert cache.float_nbytes == 2 * HEADS * 24 * DIM * 4


@pytest.mark.parametrize(
    ("bits", "dim", "groups"),
    [
        (2.5, 64, [(3, 32), (2, 32)]),
        (2.5, 128, [(3, 64), (2, 64)]),
        (3.25, 128, [(4, 32), (3, 96)]),
        (4, 128, [(4, 128)]),
    ],
)
def test_fractional_widths_average_exactly(bits, dim, groups):
    assert split_widths(bits, dim) == groups
    assert sum(b * size for b, size in groups) == bits * dim


def test_fractional_width_needs_whole_channels():
    with pytest.raises(ValueError, match=r"bits \* head_dim to be an integer, got 2.3 \* 64"):
        split_widths(2.3, 64)
    with pytest.raises(ValueError, match="integer"):
        QuantizedKVCache(HEADS, DIM, CacheConfig(key_bits=2.3))


def test_outlier_channels_come_from_the_first_tokens_and_stay_fixed():
    cache = QuantizedKVCache(HEADS, DIM, CacheConfig(key_bits=2.5, value_bits=2))
    keys, values = _tokens(7, 10)
    keys[:, :, 40:60] *= 20  # channels 40..59 dominate the first tokens, with 0..3 (scaled x8)
    cache.append(keys, values)
    outliers = cache._keys.groups[0].channels
    assert outliers.shape == (HEADS, 32)
    for head in range(HEADS):
        assert set(range(40, 60)) <= set(outliers[head])
        assert set(range(4)) <= set(outliers[head])
    later_keys, later_values = _tokens(8, 5)
    later_keys[:, :, 10:40] *= 100  # other channels dominate later: the choice does not move
    cache.append(later_keys, later_values)
    np.testing.assert_array_equal(cache._keys.groups[0].channels, outliers)


def test_fractional_widths_are_more_accurate_than_the_lower_width():
    keys, values = _tokens(9, 200)
    errors = {}
    for bits in (2, 2.5, 3):
        cache = QuantizedKVCache(HEADS, DIM, CacheConfig(key_bits=bits))
        cache.append(keys, values)
        errors[bits] = np.linalg.norm(cache.keys() - keys) / np.linalg.norm(keys)
    assert errors[3] < errors[2.5] < errors[2]


def test_error_shrinks_with_bits_and_matches_the_codebook():
    keys, values = _tokens(10, 400, scale=1.0)
    keys[:, :, :4] /= 8
    for bits in (1, 2, 3, 4):
        cache = QuantizedKVCache(HEADS, DIM, CacheConfig(key_bits=bits, value_bits=bits))
        cache.append(keys, values)
        relative = np.sum((cache.keys() - keys) ** 2, axis=2) / np.sum(keys**2, axis=2)
        expected = cache._keys.groups[0].quantizer.codebook.distortion
        # 1200 vectors: the mean relative error has a standard error of a few percent of D
        assert np.mean(relative) == pytest.approx(expected, rel=0.15)


def test_zero_vectors_round_trip_to_zero():
    keys, values = _tokens(11, 6)
    keys[1, 2] = 0.0
    values[0, 5] = 0.0
    names = ("mse4", "prod3", "fractional", "fp16-renorm", "uniform", "rotated-uniform")
    for config in (CONFIGS[name] for name in names):
        cache = QuantizedKVCache(HEADS, DIM, config)
        cache.append(keys, values)
        assert not np.any(cache.keys()[1, 2])
        assert not np.any(cache.values()[0, 5])


def test_renormalize_restores_each_stored_norm():
    keys, values = _tokens(12, 40)
    cache = QuantizedKVCache(HEADS, DIM, CacheConfig(key_bits=2, renormalize=True))
    cache.append(keys, values)
    np.testing.assert_allclose(np.linalg.norm(cache.keys(), axis=2), np.linalg.norm(keys, axis=2), rtol=1e-5)
    plain = QuantizedKVCache(HEADS, DIM, CacheConfig(key_bits=2))
    plain.append(keys, values)
    # Lloyd-Max reconstructions are shorter than the input on average
    assert np.mean(np.linalg.norm(plain.keys(), axis=2)) < np.mean(np.linalg.norm(keys, axis=2))


def test_float16_norms_are_rounded_and_overflow_is_refused():
    keys, values = _tokens(13, 8)
    cache = QuantizedKVCache(HEADS, DIM, CacheConfig(norm_dtype="float16", renormalize=True))
    cache.append(keys, values)
    rounded = np.linalg.norm(keys, axis=2).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(cache.keys(), axis=2), rounded, rtol=1e-5)
    keys[2, 3] = 1e5
    with pytest.raises(ValueError, match=r"overflows float16 \(max 65504\).*; use norm_dtype='float32'"):
        QuantizedKVCache(HEADS, DIM, CacheConfig(norm_dtype="float16")).append(keys, values)


def test_reconstructions_are_read_only():
    cache = QuantizedKVCache(HEADS, DIM)
    cache.append(*_tokens(14, 3))
    with pytest.raises(ValueError, match="read-only"):
        cache.keys()[0, 0, 0] = 1.0


@pytest.mark.parametrize(
    ("keys", "values", "error", "match"),
    [
        (
            np.zeros((HEADS, 2, DIM - 1)),
            np.zeros((HEADS, 2, DIM)),
            ValueError,
            r"keys must have shape \[3, new_tokens, 64\]",
        ),
        (np.zeros((HEADS + 1, 2, DIM)), np.zeros((HEADS, 2, DIM)), ValueError, "keys must have shape"),
        (np.zeros((HEADS, 2, DIM)), np.zeros((2, DIM)), ValueError, "values must have shape"),
        (
            np.zeros((HEADS, 2, DIM)),
            np.zeros((HEADS, 3, DIM)),
            ValueError,
            "keys have 2 new tokens but values have 3",
        ),
        (
            np.zeros((HEADS, 2, DIM), np.int32),
            np.zeros((HEADS, 2, DIM)),
            TypeError,
            "keys must be a float numpy array",
        ),
        ([[[0.0]]], np.zeros((HEADS, 2, DIM)), TypeError, "keys must be a float numpy array"),
    ],
)
def test_bad_appends_raise_naming_the_problem(keys, values, error, match):
    with pytest.raises(error, match=match):
        QuantizedKVCache(HEADS, DIM).append(keys, values)


def test_nan_in_a_token_is_named():
    keys, values = _tokens(15, 4)
    values[2, 3, 7] = np.nan
    cache = QuantizedKVCache(HEADS, DIM, CacheConfig(residual_length=10))
    with pytest.raises(ValueError, match=r"layer 0 values contain NaN \(head 2, new token 3, channel 7\)"):
        cache.append(keys, values)
    assert len(cache) == 0  # nothing half-appended


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"key_strategy": "int4"}, ValueError, "key_strategy must be one of"),
        ({"value_bits": 0}, ValueError, r"value_bits must be in \[1, 8\] for mse, got 0"),
        ({"key_bits": 9}, ValueError, r"key_bits must be in \[1, 8\]"),
        ({"key_strategy": "prod", "key_bits": 1.5}, ValueError, r"key_bits must be in \[2, 8\] for prod"),
        ({"key_bits": "4"}, TypeError, "key_bits must be a number"),
        ({"residual_length": -1}, ValueError, "residual_length must be >= 0"),
        ({"residual_length": 1.5}, TypeError, "residual_length must be an integer"),
        ({"norm_dtype": "bfloat16"}, ValueError, "norm_dtype must be one of"),
        ({"group_size": 1}, ValueError, "group_size must be >= 2, got 1"),
        ({"group_size": 16.0}, TypeError, "group_size must be an integer"),
        ({"key_strategy": "kivi", "key_bits": 2.5}, ValueError, "key_bits must be a whole number for kivi"),
    ],
)
def test_bad_configs_raise_naming_the_key(kwargs, error, match):
    with pytest.raises(error, match=match):
        CacheConfig(**kwargs)


def test_multihead_cache_with_exact_first_and_last_layers():
    overrides = exact_layers(6, first=1, last=2)
    assert sorted(overrides) == [0, 4, 5]
    model = MultiHeadKVCache(6, HEADS, DIM, CacheConfig(key_bits=3, value_bits=2), overrides)
    keys, values = _tokens(16, 12)
    for layer in range(len(model)):
        model.append(layer, keys, values)
    np.testing.assert_array_equal(model[0].keys(), keys)
    np.testing.assert_array_equal(model[5].values(), values)
    assert np.any(model[2].keys() != keys)
    summary = model.summary()
    assert [row["layer"] for row in summary] == list(range(6))
    assert summary[0]["key"] == "exact@4" and summary[1]["key"] == "mse@3"
    assert summary[0]["nbytes"] == summary[0]["float_nbytes"]
    assert summary[1]["nbytes"] < summary[1]["float_nbytes"] / 8
    assert model.nbytes == sum(row["nbytes"] for row in summary)
    assert model.float_nbytes == 6 * 2 * HEADS * 12 * DIM * 4


@pytest.mark.parametrize("name", ["mse4", "fractional", "prod3", "window", "kivi", "uniform"])
def test_append_all_equals_appending_layer_by_layer(name):
    config = CONFIGS[name]
    """One decode step for all layers (one kernel call per stream) stores what per-layer appends store."""
    overrides = exact_layers(4, first=1)
    one_by_one = MultiHeadKVCache(4, HEADS, DIM, config, overrides)
    together = MultiHeadKVCache(4, HEADS, DIM, config, overrides)
    steps = [_tokens(30 + step, t) for step, t in enumerate([9, 1, 1, 3])]
    for keys, values in steps:
        layer_keys = [keys * (layer + 1) for layer in range(4)]
        for layer in range(4):
            one_by_one.append(layer, layer_keys[layer], values)
        together.append_all(layer_keys, [values] * 4)
    for layer in range(4):
        np.testing.assert_allclose(together[layer].keys(), one_by_one[layer].keys(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(together[layer].values(), one_by_one[layer].values(), rtol=1e-5, atol=1e-5)
    assert together.nbytes == one_by_one.nbytes
    with pytest.raises(ValueError, match="need keys and values for all 4 layers, got 3 and 4"):
        together.append_all(layer_keys[:3], [values] * 4)


def test_overrides_outside_the_model_are_refused():
    with pytest.raises(ValueError, match=r"layer overrides \[7\] are outside the model's layers 0..5"):
        MultiHeadKVCache(6, HEADS, DIM, layer_configs={7: CacheConfig()})


@pytest.mark.parametrize("name", ["mse4", "window", "kivi", "uniform"])
def test_keep_reconstruction_false_stores_the_same_tokens(name):
    """Without the float reconstruction the cache stores the same codes and rebuilds the same
    keys and values from them (baselines too); its working buffer holds only the exact window."""
    keys, values = _tokens(40, 60)
    kept, packed = (
        QuantizedKVCache(HEADS, DIM, CONFIGS[name], keep_reconstruction=flag) for flag in (True, False)
    )
    for cache in (kept, packed):
        _fill(cache, keys, values, [20, 1, 1, 30, 8])
    np.testing.assert_allclose(packed.keys(), kept.keys(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(packed.values(), kept.values(), rtol=1e-6, atol=1e-6)
    assert packed.nbytes == kept.nbytes and packed.quantized_tokens == kept.quantized_tokens
    assert packed.buffer_nbytes < kept.buffer_nbytes
    assert packed.keys().flags.writeable is False


def test_copy_is_independent():
    cache = QuantizedKVCache(HEADS, DIM, CONFIGS["prod3"])
    _fill(cache, *_tokens(41, 12), [12])
    twin = cache.copy()
    twin.append(*_tokens(42, 3))
    assert len(cache) == 12 and len(twin) == 15
    np.testing.assert_array_equal(twin.keys()[:, :12], cache.keys())
    assert twin._keys.groups[0].quantizer is cache._keys.groups[0].quantizer  # shared, not copied


def test_append_each_checks_everything_before_adding_anything():
    caches = [QuantizedKVCache(HEADS, DIM), QuantizedKVCache(HEADS, DIM)]
    good, bad = _tokens(43, 2), _tokens(44, 2)
    bad[0][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        append_each(caches, [good[0], bad[0]], [good[1], bad[1]])
    assert [len(cache) for cache in caches] == [0, 0]
    append_each(caches, [good[0], good[0] * 2], [good[1], good[1]])
    single = QuantizedKVCache(HEADS, DIM)
    single.append(good[0] * 2, good[1])
    np.testing.assert_allclose(caches[1].keys(), single.keys(), rtol=1e-6, atol=1e-6)
