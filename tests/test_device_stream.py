"""The device store (tq.quant.torch_codec, tq.cache.device_stream): torch tensors that hold the
bytes tq's host caches hold, bit for bit.

The torch codec's codes, norms, QJL signs and residual norms equal the CPU kernel's
(tq.kernels.cpu) for every width; a device stream fed the same tokens call by call holds the same
bytes as one host cache (tq.cache.kvcache.QuantizedKVCache) per sequence, counts the same
``nbytes``, and reconstructs what the host reconstructs (float32 rounding apart:
``RECONSTRUCTION_TOLERANCE`` of the largest value; the decodes are float32 products in a
different order).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tq.cache.config import CacheConfig  # noqa: E402
from tq.cache.device_stream import DeviceStream  # noqa: E402
from tq.cache.kvcache import QuantizedKVCache  # noqa: E402
from tq.quant.torch_codec import TorchCodec, pack_codes, unpack_codes  # noqa: E402
from tq.quant.turboquant import TurboQuantMSE, TurboQuantProd  # noqa: E402

RECONSTRUCTION_TOLERANCE = 1e-5
SEED = 11
# Every test runs on the CPU; on a machine with a CUDA GPU (scripts/gpu-check.sh) the store and
# codec tests run there too, against the same host bytes.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch")
    ),
]


def rows(n: int, dim: int, seed: int) -> np.ndarray:
    """Rows of mixed scales (norms from 0.05 to 40) and one zero row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)) * rng.uniform(0.05, 40, (n, 1))
    x[3] = 0
    return x.astype(np.float32)


@pytest.mark.parametrize("bits", range(1, 9))
def test_torch_packing_is_the_numpy_layout(bits):
    from tq.core.packing import pack_codes as numpy_pack

    for dim in (16, 24, 37):
        codes = np.random.default_rng(bits).integers(0, 1 << bits, (5, dim)).astype(np.uint8)
        packed = pack_codes(torch.from_numpy(codes), bits)
        assert np.array_equal(packed.numpy(), numpy_pack(codes, bits))
        assert np.array_equal(unpack_codes(packed, dim, bits).numpy(), codes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rotation", ["haar", "hadamard"])
@pytest.mark.parametrize("strategy", ["mse", "prod"])
def test_torch_codec_packs_the_cpu_kernels_bytes(strategy, rotation, device):
    """Every width, dimensions of whole and split bytes: 2,000 rows of each byte for byte."""
    dims = (64, 16) if rotation == "hadamard" else (64, 24)
    for dim in dims:
        x = rows(2000, dim, seed=dim)
        for bits in range(1 if strategy == "mse" else 2, 9):
            quantizer = (TurboQuantMSE if strategy == "mse" else TurboQuantProd)(
                dim, bits, seed=SEED, normalize=True, rotation=rotation
            )
            expected = quantizer.quantize(x)
            codec = TorchCodec(quantizer, device)
            stored = codec.encode(torch.from_numpy(x).to(device))
            what = f"{strategy} {rotation} d={dim} b={bits}"
            fields = ("codes", "norms", "signs", "gammas") if strategy == "prod" else ("codes", "norms")
            for name in fields:
                assert np.array_equal(getattr(stored, name).cpu().numpy(), getattr(expected, name)), (
                    what,
                    name,
                )
            decoded = codec.decode(stored).cpu().numpy()
            error = np.abs(decoded - quantizer.dequantize(expected)).max() / np.abs(x).max()
            assert error < RECONSTRUCTION_TOLERANCE, (what, error)


def test_torch_codec_refuses_a_quantizer_without_norms():
    with pytest.raises(ValueError, match="normalize=True"):
        TorchCodec(TurboQuantMSE(16, 2), "cpu")


CONFIGS = {
    "mse4": CacheConfig(),
    "prod3": CacheConfig(key_strategy="prod", key_bits=3, value_bits=2),
    "fractional": CacheConfig(key_bits=2.5, value_bits=3.25, value_strategy="prod"),
    "window": CacheConfig(key_bits=3, value_bits=3, residual_length=5),
    "centred-fp16": CacheConfig(key_bits=3, value_bits=2, center_keys=True, norm_dtype="float16"),
    "hadamard-renorm": CacheConfig(rotation="hadamard", renormalize=True, key_bits=2.5, seed=4),
    "exact-keys": CacheConfig(key_strategy="exact", value_bits=2),
    "uniform": CacheConfig(key_strategy="uniform", value_strategy="uniform", value_bits=2, group_size=12),
    "rotated-uniform": CacheConfig(
        key_strategy="rotated-uniform",
        value_strategy="rotated-uniform",
        rotation="hadamard",
        residual_length=3,
    ),
    "kivi": CacheConfig(key_strategy="kivi", value_strategy="kivi", key_bits=2, value_bits=2, group_size=4),
    "fp8-token": CacheConfig(key_strategy="fp8", key_bits=8, value_strategy="uniform", value_bits=4),
    "fp8-head-centred": CacheConfig(key_strategy="fp8", key_bits=8, fp8_scale="head", center_keys=True),
}


def host_fields(store, heads: int, group: int, name: str) -> np.ndarray:
    """One field of one channel group of a host stream, [kv_heads, entries, ...] as float32."""
    pieces = []
    for batch, start, stop in store.groups[group].pieces:
        value = getattr(batch.rows(start, stop), name)
        pieces.append(value.reshape(heads, len(value) // heads, *value.shape[1:]).astype(np.float32))
    return np.concatenate(pieces, axis=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keep", [True, False], ids=["reconstruct", "packed"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_device_stream_holds_the_host_caches_bytes(name, keep, device):
    """Two sequences, 2 heads of 32 channels: a prefill of 12 tokens, then 9 calls of one token
    and one of 3; after every call both stores hold the same codes, bytes and tokens."""
    config, heads, dim = CONFIGS[name], 2, 32
    rng = np.random.default_rng(5)
    offset = rng.standard_normal((1, heads, 1, dim)) * 6  # a shared key offset, as Qwen's
    calls = [12] + [1] * 9 + [3]
    keys = (rng.standard_normal((2, heads, sum(calls), dim)) + offset).astype(np.float32)
    values = rng.standard_normal((2, heads, sum(calls), dim)).astype(np.float32)
    hosts = [QuantizedKVCache(heads, dim, config, keep_reconstruction=keep) for _ in range(2)]
    streams = [
        DeviceStream(heads, dim, part, seed, config, keep)
        for part, seed in (("key", config.seed), ("value", config.seed + 1))
    ]
    position = 0
    for count in calls:
        span = slice(position, position + count)
        for row, host in enumerate(hosts):
            host.append(keys[row, :, span], values[row, :, span])
        for stream, tokens in zip(streams, (keys, values), strict=True):
            stream.push(torch.from_numpy(tokens[:, :, span]).to(device))
            stream.settle()
        position += count
        for stream, attribute in zip(streams, ("_keys", "_values"), strict=True):
            stores = [getattr(host, attribute) for host in hosts]
            assert stream.quantized == (stores[0].quantized if stream.quantizes else 0), (attribute, position)
            assert stream.nbytes == sum(store.nbytes for store in stores), (attribute, position)
            for row, store in enumerate(stores):
                for index, group in enumerate(stream.groups):
                    for field in group.codec.fields:
                        held = group.stored[field.name][row, :, : stream.quantized // field.per].cpu()
                        expected = host_fields(store, heads, index, field.name)
                        assert np.array_equal(held.float().numpy(), expected), (attribute, field.name)
                if store.center is not None:
                    assert np.array_equal(stream.center[row].cpu().numpy(), store.center)
                rebuilt = stream.view(0).cpu().numpy()[row]
                expected = store.view()
                error = np.abs(rebuilt - expected).max() / np.abs(expected).max()
                assert error < RECONSTRUCTION_TOLERANCE, (attribute, position, error)


def test_a_device_stream_reorders_copies_and_joins_its_sequences():
    config = CacheConfig(key_bits=2.5, value_bits=2)
    tokens = torch.from_numpy(np.random.default_rng(6).standard_normal((3, 2, 10, 16)).astype(np.float32))
    stream = DeviceStream(2, 16, "key", 0, config, True)
    stream.push(tokens)
    stream.settle()
    twin = stream.copy()
    stream.select(torch.tensor([2, 2, 0]))
    assert torch.equal(stream.view(0)[0], twin.view(0)[2])
    held = stream.quantized
    assert torch.equal(
        stream.groups[0].stored["codes"][1, :, :held], twin.groups[0].stored["codes"][2, :, :held]
    )
    assert torch.equal(stream.groups[0].channels[2], twin.groups[0].channels[0])
    joined = DeviceStream.concatenate([twin, stream])
    assert joined.batch == 6 and joined.nbytes == twin.nbytes + stream.nbytes
    assert torch.equal(joined.view(0)[3:], stream.view(0))
    stream.push(tokens[:, :, :1])
    with pytest.raises(ValueError, match="the same positions"):
        DeviceStream.concatenate([twin, stream])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_stream_quantizes_the_float32_values(dtype):
    """Tokens of a bfloat16 or float16 model are quantized from their float32 values (the same
    codes as a float32 stream fed them), reconstructed into the model's dtype, and their exact
    tokens are counted at its element size."""
    config = CacheConfig(key_bits=3, value_bits=3, residual_length=4)
    tokens = torch.from_numpy(np.random.default_rng(7).standard_normal((2, 2, 20, 32)).astype(np.float32)).to(
        dtype
    )
    half, full = (DeviceStream(2, 32, "key", 0, config, True) for _ in range(2))
    for stream, fed in ((half, tokens), (full, tokens.float())):
        stream.push(fed)
        stream.settle()
    held = half.quantized
    codes = [stream.groups[0].stored["codes"][:, :, :held] for stream in (half, full)]
    assert held == 16 and torch.equal(*codes)
    assert half.view(0).dtype == dtype
    assert torch.equal(half.view(0)[:, :, :16], full.view(0)[:, :, :16].to(dtype))
    exact_bytes = 2 * 2 * 4 * 32
    assert full.nbytes - half.nbytes == exact_bytes * (4 - 2)
