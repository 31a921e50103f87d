"""Inputs that are refused are refused for what is wrong with them: a finite norm that overflows
float16 is not "inf", a float64 value beyond float32 is not "NaN or inf", an unsigned position
beyond int64 is not "negative", and a cache error names its layer."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy

from tq.cache.config import CacheConfig
from tq.cache.kvcache import MultiHeadKVCache, QuantizedKVCache, append_batch
from tq.data.trace import KvTrace, TraceFormatError
from tq.quant.turboquant import TurboQuantMSE

HEADS, DIM, LAYERS = 2, 16, 3


def _zeros(tokens: int = 2, dtype=np.float32) -> np.ndarray:
    return np.zeros((HEADS, tokens, DIM), dtype)


def test_a_finite_norm_beyond_float16_is_named_with_its_value():
    keys = _zeros()
    keys[1, 1] = 1e30  # norm 4e30: finite, and its square overflows float32
    cache = QuantizedKVCache(HEADS, DIM, CacheConfig(norm_dtype="float16"))
    with pytest.raises(
        ValueError, match=r"the norm 4e\+30 of a vector \(head 1, new token 1\) overflows"
    ) as error:
        cache.append(keys, _zeros())
    assert "float16 (max 65504)" in str(error.value) and "use norm_dtype='float32'" in str(error.value)
    assert "inf" not in str(error.value)


def test_a_float64_value_beyond_float32_is_named_with_its_position():
    keys = _zeros(dtype=np.float64)
    keys[0, 1, 3] = 1e39
    with pytest.raises(
        ValueError,
        match=r"layer 0 keys: 1e\+39 \(head 0, new token 1, channel 3\) overflows float32 "
        r"\(max 3\.40282e\+38\), the precision the cache computes in",
    ):
        QuantizedKVCache(HEADS, DIM).append(keys, _zeros(dtype=np.float64))


def test_the_quantizer_names_a_float64_value_beyond_float32():
    x = np.zeros((3, DIM))
    x[2, 5] = -1e39
    with pytest.raises(
        ValueError, match=r"x row 2 has a value beyond the float32 range \(-1e\+39 in column 5"
    ):
        TurboQuantMSE(DIM, 2, normalize=True).quantize(x)


def test_the_largest_float64_that_rounds_into_float32_is_accepted():
    keys = _zeros(dtype=np.float64)
    keys[0, 0, 0] = float(np.nextafter(np.float64(np.finfo(np.float32).max), np.inf))  # rounds down
    QuantizedKVCache(HEADS, DIM, CacheConfig(key_strategy="exact", value_strategy="exact")).append(
        keys, _zeros(dtype=np.float64)
    )


@pytest.mark.parametrize(("value", "word"), [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")])
def test_a_multi_layer_cache_names_the_layer_head_token_and_channel(value, word):
    keys = [_zeros() for _ in range(LAYERS)]
    keys[2][1, 0, 9] = value
    cache = MultiHeadKVCache(LAYERS, HEADS, DIM)
    with pytest.raises(
        ValueError, match=rf"^layer 2 keys contain {word} \(head 1, new token 0, channel 9\)$"
    ):
        cache.append_all(keys, [_zeros() for _ in range(LAYERS)])
    with pytest.raises(ValueError, match=rf"^layer 2 keys contain {word}"):
        append_batch([cache], [k[None] for k in keys], [_zeros()[None] for _ in range(LAYERS)])
    assert all(len(layer) == 0 for layer in cache.layers)  # nothing half-appended


def _foreign_trace(path, positions: np.ndarray) -> None:
    """A trace as another tool writes it (no checksum, no format key), with these positions."""
    rng = np.random.default_rng(0)
    samples, queries = positions.shape
    tensors = {
        "keys": rng.standard_normal((samples, 8, 4)).astype(np.float32),
        "values": rng.standard_normal((samples, 8, 4)).astype(np.float32),
        "queries": rng.standard_normal((samples, queries, 4)).astype(np.float32),
        "query_positions": positions,
    }
    safetensors.numpy.save_file(tensors, str(path), metadata={"model": "m", "layer": "0", "head": "0"})


def test_an_unsigned_position_beyond_int64_is_out_of_range_not_negative(tmp_path):
    path = tmp_path / "foreign.safetensors"
    _foreign_trace(path, np.array([[1, 2, 3], [4, 5, 2**63 + 7]], np.uint64))
    with pytest.raises(
        TraceFormatError, match=rf"{path}: query_positions\[1, 2\] = 9223372036854775815 is >= seq \(8\)"
    ):
        KvTrace.load(path)
    _foreign_trace(path, np.array([[1, 2, 3], [4, 5, 7]], np.uint64))
    assert KvTrace.load(path).query_positions.dtype == np.int64  # in range: loads


def test_an_unsigned_sample_index_beyond_int64_is_out_of_range(tmp_path):
    path = tmp_path / "foreign.safetensors"
    _foreign_trace(path, np.array([[1], [2]], np.uint64))
    trace = KvTrace.load(path)
    with pytest.raises(IndexError, match="sample 9223372036854775815 out of range for a trace of 2 samples"):
        trace.select(np.array([2**63 + 7], np.uint64))
    assert trace.select(np.array([1, 0], np.uint64)).samples == 2
