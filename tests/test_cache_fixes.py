"""The fixes serving stacks use for TurboQuant's key collapse, as cache options: key mean-centring,
FP8 streams, any set of exact layers, and vLLM's named presets; each against a NumPy oracle."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from tq.cache.config import CacheConfig, exact_layers
from tq.cache.kvcache import MultiHeadKVCache, QuantizedKVCache
from tq.cache.packed_view import packed_cache
from tq.cache.presets import CACHE_PRESETS, CachePresetError, expand_preset
from tq.cli import main
from tq.quant.fp8 import FP8_MAX

KV_HEADS, HEAD_DIM = 2, 64
PREFILL, DECODE = 24, 8


def _biased_keys(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Keys with a large offset shared by every token of a head (Qwen2's key bias), and values."""
    rng = np.random.default_rng(seed)
    tokens = PREFILL + DECODE
    offset = 40.0 * rng.normal(size=(KV_HEADS, 1, HEAD_DIM))
    keys = (offset + rng.normal(size=(KV_HEADS, tokens, HEAD_DIM))).astype(np.float32)
    values = rng.normal(size=(KV_HEADS, tokens, HEAD_DIM)).astype(np.float32)
    return keys, values


def _fill(cache: QuantizedKVCache, keys: np.ndarray, values: np.ndarray) -> QuantizedKVCache:
    """A prefill of PREFILL tokens, then one token at a time."""
    cache.append(keys[:, :PREFILL], values[:, :PREFILL])
    for t in range(PREFILL, keys.shape[1]):
        cache.append(keys[:, t : t + 1], values[:, t : t + 1])
    return cache


@pytest.mark.parametrize("strategy", ["mse", "prod", "uniform", "kivi"])
def test_centred_keys_are_the_mean_plus_the_centred_keys_quantized(strategy: str) -> None:
    keys, values = _biased_keys()
    config = CacheConfig(4, 4, key_strategy=strategy, value_strategy=strategy, group_size=8)
    centred = _fill(
        QuantizedKVCache(KV_HEADS, HEAD_DIM, CacheConfig(**{**config.describe(), "center_keys": True})),
        keys,
        values,
    )
    mean = keys[:, :PREFILL].mean(axis=1, dtype=np.float64).astype(np.float32)  # the prefill's
    oracle = _fill(QuantizedKVCache(KV_HEADS, HEAD_DIM, config), keys - mean[:, None], values)
    np.testing.assert_allclose(centred.keys(), oracle.keys() + mean[:, None], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(centred.values(), oracle.values())  # values are never centred
    stored_keys, _ = centred.dequantize_stored()
    np.testing.assert_allclose(stored_keys, centred.keys()[:, : stored_keys.shape[1]], rtol=0, atol=1e-4)
    # the mean is stored once per head, fp32
    assert centred.nbytes - oracle.nbytes == KV_HEADS * HEAD_DIM * 4


def test_centring_changes_scores_only_by_the_centred_keys_error() -> None:
    keys, values = _biased_keys(1)
    plain = _fill(QuantizedKVCache(KV_HEADS, HEAD_DIM, CacheConfig(3, 3)), keys, values)
    centred = _fill(QuantizedKVCache(KV_HEADS, HEAD_DIM, CacheConfig(3, 3, center_keys=True)), keys, values)
    query = np.random.default_rng(2).normal(size=(KV_HEADS, 1, HEAD_DIM)).astype(np.float32)
    exact = np.einsum("hqd,htd->hqt", query, keys)
    mean = keys[:, :PREFILL].mean(axis=1)
    centred_error = np.einsum("hqd,htd->hqt", query, centred.keys() - keys)
    # the score error is q . (quantized centred key - centred key): the mean cancels exactly
    oracle = _fill(QuantizedKVCache(KV_HEADS, HEAD_DIM, CacheConfig(3, 3)), keys - mean[:, None], values)
    np.testing.assert_allclose(
        centred_error, np.einsum("hqd,htd->hqt", query, oracle.keys() - (keys - mean[:, None])), atol=2e-3
    )
    plain_error = np.einsum("hqd,htd->hqt", query, plain.keys()) - exact
    assert np.abs(centred_error).mean() < 0.2 * np.abs(plain_error).mean()


def test_centring_leaves_exact_keys_alone_and_packed_attention_refuses_it() -> None:
    keys, values = _biased_keys()
    exact = _fill(
        QuantizedKVCache(KV_HEADS, HEAD_DIM, CacheConfig(4, 4, key_strategy="exact", center_keys=True)),
        keys,
        values,
    )
    np.testing.assert_array_equal(exact.keys(), keys)
    centred = _fill(
        QuantizedKVCache(KV_HEADS, HEAD_DIM, CacheConfig(4, 4, center_keys=True), keep_reconstruction=False),
        keys,
        values,
    )
    with pytest.raises(NotImplementedError, match="centred keys"):
        packed_cache(centred)


def _fp8_oracle(x: np.ndarray) -> np.ndarray:
    """E4M3 rounding by ml_dtypes (no saturation: callers stay within +-448)."""
    return x.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


def test_fp8_token_scale_matches_ml_dtypes() -> None:
    keys, values = _biased_keys(3)
    cache = _fill(
        QuantizedKVCache(KV_HEADS, HEAD_DIM, CacheConfig(8, 4, key_strategy="fp8", value_strategy="uniform")),
        keys,
        values,
    )
    peak = np.abs(keys).max(axis=2, keepdims=True)
    scale = (peak / FP8_MAX).astype(np.float16)  # then the smallest float16 >= peak / 448
    scale = np.where(
        scale.astype(np.float32) * FP8_MAX < peak, np.nextafter(scale, np.float16(np.inf)), scale
    )
    scale = scale.astype(np.float32)
    np.testing.assert_allclose(cache.keys(), _fp8_oracle(keys / scale) * scale, rtol=1e-6, atol=0)
    bits = cache.bits_per_coordinate()
    assert bits["key_code_bits"] == 8
    assert bits["key_stored_bits"] == pytest.approx(8 + 16 / HEAD_DIM)


def test_fp8_head_scale_is_fixed_by_the_prefill_and_saturates_beyond() -> None:
    keys, values = _biased_keys(4)
    keys[:, -1] *= 4  # a late token beyond the prefill's range
    config = CacheConfig(8, 8, key_strategy="fp8", value_strategy="fp8", fp8_scale="head")
    cache = _fill(QuantizedKVCache(KV_HEADS, HEAD_DIM, config), keys, values)
    scale = (np.abs(keys[:, :PREFILL]).max(axis=(1, 2)) / FP8_MAX).astype(np.float32)[:, None, None]
    scaled = np.clip(keys / scale, -FP8_MAX, FP8_MAX)
    np.testing.assert_allclose(cache.keys(), _fp8_oracle(scaled) * scale, rtol=1e-6)
    assert np.abs(cache.keys()[:, -1]).max() <= FP8_MAX * scale.max() * (1 + 1e-6)
    # codes, and one fp32 scale per head and stream
    assert cache.nbytes == 2 * KV_HEADS * keys.shape[1] * HEAD_DIM + 2 * KV_HEADS * 4


def test_fp8_with_centred_keys_scales_the_centred_keys() -> None:
    keys, values = _biased_keys(5)
    config = CacheConfig(8, 4, key_strategy="fp8", fp8_scale="head", center_keys=True)
    cache = _fill(QuantizedKVCache(KV_HEADS, HEAD_DIM, config), keys, values)
    mean = keys[:, :PREFILL].mean(axis=1, dtype=np.float64).astype(np.float32)[:, None]
    centred = keys - mean
    scale = (np.abs(centred[:, :PREFILL]).max(axis=(1, 2)) / FP8_MAX).astype(np.float32)[:, None, None]
    oracle = _fp8_oracle(np.clip(centred / scale, -FP8_MAX, FP8_MAX)) * scale + mean
    np.testing.assert_allclose(cache.keys(), oracle, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"key_bits": 4, "key_strategy": "fp8"}, "must be 8 for fp8"),
        ({"fp8_scale": "tensor"}, "fp8_scale must be one of"),
        ({"center_keys": "yes"}, "center_keys must be true or false"),
    ],
)
def test_bad_fix_options_are_refused(fields: dict, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        CacheConfig(**{"key_bits": 4, "value_bits": 4, **fields})


def test_any_set_of_layers_kept_exact() -> None:
    assert sorted(exact_layers(24, layers=[0, 1, 2, 4, 8])) == [0, 1, 2, 4, 8]
    assert sorted(exact_layers(24, 2, 2, [4, 8])) == [0, 1, 4, 8, 22, 23]
    with pytest.raises(ValueError, match=r"exact layers \[24\] are outside"):
        exact_layers(24, layers=[24])
    cache = MultiHeadKVCache(6, KV_HEADS, HEAD_DIM, CacheConfig(2, 2), exact_layers(6, layers=[1, 4]))
    assert [layer.config.key_strategy for layer in cache.layers] == [
        "mse",
        "exact",
        "mse",
        "mse",
        "exact",
        "mse",
    ]


def test_vllm_presets_say_what_vllm_stores() -> None:
    assert set(CACHE_PRESETS) == {"vllm-k8v4", "vllm-4bit_nc", "vllm-k3v4_nc", "vllm-3bit_nc"}
    for name, fields in CACHE_PRESETS.items():
        config = CacheConfig(**{k: v for k, v in fields.items() if not k.startswith("exact_")})
        assert (fields["exact_first_layers"], fields["exact_last_layers"]) == (2, 2)
        assert config.value_strategy == "uniform" and config.group_size >= 256
        if name == "vllm-k8v4":
            assert (config.key_strategy, config.key_bits, config.value_bits) == ("fp8", 8, 4)
        else:
            assert config.key_strategy == "mse" and config.rotation == "hadamard"
            assert config.renormalize and config.norm_dtype == "float16"
    assert expand_preset({"preset": "vllm-3bit_nc"})["value_bits"] == 3
    assert expand_preset({"preset": "vllm-4bit_nc", "center_keys": True})["center_keys"] is True
    with pytest.raises(CachePresetError, match="unknown cache preset 'vllm-2bit'"):
        expand_preset({"preset": "vllm-2bit"})


def test_a_vllm_preset_stores_fp16_norms_and_per_vector_value_scales() -> None:
    keys, values = _biased_keys(6)
    fields = {k: v for k, v in CACHE_PRESETS["vllm-4bit_nc"].items() if not k.startswith("exact_")}
    cache = _fill(QuantizedKVCache(KV_HEADS, HEAD_DIM, CacheConfig(**fields)), keys, values)
    bits = cache.bits_per_coordinate()
    assert bits["key_stored_bits"] == pytest.approx(4 + 16 / HEAD_DIM)  # codes + an fp16 norm
    assert bits["value_stored_bits"] == pytest.approx(4 + 32 / HEAD_DIM)  # codes + fp16 scale, zero


def _cli_record(bundle, tmp_path, *options: str) -> dict:
    """``tq bench --workload real-model`` on the tiny bundle with cache ``options``: its record."""
    out = tmp_path / "record.json"
    args = ["bench", "--workload", "real-model", "--real-model-dir", str(bundle), "--prompt", "keys"]
    assert main([*args, "--max-new-tokens", "2", *options, "--json", str(out)]) == 0
    return json.loads(out.read_text())["config"]


def test_the_cli_takes_the_fixes_and_any_exact_layers(tiny_llama_bundle, tmp_path):
    config = _cli_record(
        tiny_llama_bundle, tmp_path, "--bits", "8", "--strategy", "fp8", "--value-bits", "3",
        "--value-strategy", "mse", "--fp8-scale", "head", "--center-keys", "--exact-layers", "1",
    )  # fmt: skip
    cache = config["cache"]
    assert (cache["key_strategy"], cache["key_bits"], cache["value_strategy"], cache["value_bits"]) == (
        "fp8", 8, "mse", 3,
    )  # fmt: skip
    assert cache["fp8_scale"] == "head" and cache["center_keys"] is True
    assert config["exact_layers"] == [1]


def test_a_cli_preset_is_overridden_by_the_options_given_besides_it(tiny_llama_bundle, tmp_path):
    config = _cli_record(
        tiny_llama_bundle, tmp_path, "--cache-preset", "vllm-4bit_nc", "--exact-first-layers", "0",
        "--exact-last-layers", "1", "--center-keys",
    )  # fmt: skip
    cache = config["cache"]
    assert (cache["key_bits"], cache["rotation"], cache["norm_dtype"], cache["renormalize"]) == (
        4, "hadamard", "float16", True,
    )  # fmt: skip
    assert cache["value_strategy"] == "uniform" and cache["center_keys"] is True
    assert config["exact_layers"] == [1]  # the preset's 2 and 2 boundary layers, given as 0 and 1


def test_bad_exact_layers_on_the_cli_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--workload", "real-model", "--exact-layers", "1,x"])
    assert "expected layer indices separated by commas, got '1,x'" in capsys.readouterr().err
