"""Packed batches: validation, sizes and safetensors files (docs/design.md section 4)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given
from hypothesis import strategies as st

from tq import BatchFormatError, BatchQuantizedMSE, BatchQuantizedProd, TurboQuantMSE, TurboQuantProd
from tq.core.fileio import save_tensors
from tq.core.packing import code_bytes, pack_codes, pack_signs

# Files are compared exactly: a save/load round trip must not change a single bit.


def random_batch(kind: str, dim: int, bits: int, n: int, normalized: bool, seed: int, rotation: str):
    """A valid batch of random content, built without a quantizer."""
    rng = np.random.default_rng(seed)
    code_bits = bits if kind == "mse" else bits - 1
    codes = pack_codes(rng.integers(0, 2**code_bits, (n, dim), dtype=np.uint8), code_bits)
    norms = rng.uniform(0, 10, n).astype(np.float32) if normalized else None
    if kind == "mse":
        return BatchQuantizedMSE(dim, bits, seed, rotation, codes, norms)
    signs = pack_signs(rng.random((n, dim)) < 0.5)
    gammas = rng.uniform(0, 1, n).astype(np.float32)
    return BatchQuantizedProd(dim, bits, seed, rotation, codes, norms, signs=signs, gammas=gammas)


def assert_same_batch(loaded, batch):
    assert type(loaded) is type(batch)
    for name in ("dim", "bits", "seed", "rotation"):
        assert getattr(loaded, name) == getattr(batch, name)
    for name in ("codes", "norms", "signs", "gammas"):
        expected = getattr(batch, name, None)
        actual = getattr(loaded, name, None)
        if expected is None:
            assert actual is None
        else:
            assert actual.dtype == expected.dtype and actual.shape == expected.shape
            assert actual.tobytes() == expected.tobytes()


def rewrite(path: Path, tensors=None, metadata=None, keep_checksum=True) -> None:
    """Rewrite a batch file with some tensors or metadata replaced.

    With ``keep_checksum`` the old checksum stays (a tampered file); without it the file gets a
    fresh, matching checksum (a file written by a buggy writer).
    """
    old_tensors = safetensors.numpy.load_file(path)
    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    old_metadata = json.loads(path.read_bytes()[8 : 8 + header_size])["__metadata__"]
    new_tensors = {**old_tensors, **(tensors or {})}
    new_metadata = {**old_metadata, **(metadata or {})}
    if keep_checksum:
        safetensors.numpy.save_file(new_tensors, path, metadata=new_metadata)
    else:
        new_metadata.pop("sha256")
        save_tensors(path, new_tensors, new_metadata)


@st.composite
def batches(draw):
    kind = draw(st.sampled_from(["mse", "prod"]))
    return random_batch(
        kind,
        dim=draw(st.integers(2, 100)),
        bits=draw(st.integers(1 if kind == "mse" else 2, 8)),
        n=draw(st.integers(0, 4)),
        normalized=draw(st.booleans()),
        seed=draw(st.integers(0, 2**40)),
        rotation=draw(st.sampled_from(["haar", "hadamard"])),
    )


@given(batches())
def test_save_load_round_trip_keeps_every_array_and_field(batch):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batch.safetensors"
        batch.save(path)
        assert_same_batch(type(batch).load(path), batch)
        assert_same_batch(BatchQuantizedMSE.load(path), batch)  # the base class finds the kind


@pytest.mark.parametrize("normalize", [False, True])
def test_quantized_batches_round_trip_through_files(tmp_path, unit_rows, normalize):
    x = unit_rows(20, 48, seed=1) * (3.0 if normalize else 1.0)
    for quantizer in (
        TurboQuantMSE(48, 3, seed=2, normalize=normalize),
        TurboQuantProd(48, 3, seed=2, normalize=normalize),
    ):
        batch = quantizer.quantize(x)
        path = tmp_path / f"{type(batch).__name__}.safetensors"
        batch.save(path)
        loaded = BatchQuantizedMSE.load(path)
        assert_same_batch(loaded, batch)
        np.testing.assert_array_equal(quantizer.dequantize(loaded), quantizer.dequantize(batch))


def test_prod_load_rejects_an_mse_file(tmp_path):
    path = tmp_path / "mse.safetensors"
    random_batch("mse", 16, 2, 3, False, 0, "haar").save(path)
    with pytest.raises(BatchFormatError, match=r"kind is 'mse', expected one of \['prod'\]"):
        BatchQuantizedProd.load(path)


@pytest.mark.parametrize(
    ("kind", "dim", "bits", "normalized", "bits_per_vector"),
    [
        ("mse", 64, 3, False, 64 * 3),  # 3-bit codes take 3 bits each
        ("mse", 64, 3, True, 64 * 3 + 32),  # plus a float32 norm
        ("mse", 100, 3, False, 38 * 8),  # 300 bits padded to 38 bytes
        ("mse", 64, 8, False, 64 * 8),
        ("prod", 64, 3, False, 64 * 2 + 64 + 32),  # 2-bit codes, 1 sign bit, float32 gamma
        ("prod", 64, 3, True, 64 * 2 + 64 + 32 + 32),
        ("prod", 10, 2, False, 16 + 16 + 32),  # 10 bits of codes and of signs: 2 bytes each
    ],
)
def test_sizes_count_every_stored_bit(kind, dim, bits, normalized, bits_per_vector):
    n = 7
    batch = random_batch(kind, dim, bits, n, normalized, 0, "haar")
    assert len(batch) == n
    assert batch.bits_per_vector == bits_per_vector
    assert batch.nbytes == n * bits_per_vector // 8
    assert random_batch(kind, dim, bits, 0, normalized, 0, "haar").bits_per_vector == bits_per_vector


def test_bits_per_vector_of_quantizer_output():
    quantizer = TurboQuantProd(128, 4, normalize=True)
    batch = quantizer.quantize(np.ones((3, 128)))
    assert batch.codes.shape == (3, code_bytes(128, 3))
    assert batch.bits_per_vector == 128 * 4 + 2 * 32  # codes and signs, then gamma and norm


# ---- invalid batches in memory --------------------------------------------------------------


def mse_fields(**changes):
    fields = dict(
        dim=5, bits=3, seed=0, rotation="haar", codes=pack_codes(np.ones((2, 5), np.uint8), 3), norms=None
    )
    return {**fields, **changes}


def prod_fields(**changes):
    fields = dict(
        dim=5,
        bits=3,
        seed=0,
        rotation="haar",
        codes=pack_codes(np.ones((2, 5), np.uint8), 2),
        norms=None,
        signs=pack_signs(np.ones((2, 5), bool)),
        gammas=np.ones(2, np.float32),
    )
    return {**fields, **changes}


def with_padding_bit(packed: np.ndarray) -> np.ndarray:
    packed = packed.copy()
    packed[-1, -1] |= 0x80
    return packed


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (mse_fields(bits=0), r"bits must be in \[1, 8\], got 0"),
        (mse_fields(bits=9), r"bits must be in \[1, 8\], got 9"),
        (mse_fields(dim=1), r"dim must be in \[2, 4096\], got 1"),
        (mse_fields(dim=5.0), "dim must be an integer"),
        (mse_fields(seed=-1), "seed must be non-negative, got -1"),
        (mse_fields(rotation="givens"), "rotation must be one of .*got 'givens'"),
        (mse_fields(codes=np.ones((2, 2), np.int8)), "codes must be a uint8 array, got int8"),
        (mse_fields(codes=np.ones((2, 3), np.uint8)), r"codes must have shape \[n, 2\] for dim=5 at 3 bits"),
        (mse_fields(codes=np.ones(2, np.uint8)), r"codes must have shape \[n, 2\]"),
        (mse_fields(codes=with_padding_bit(pack_codes(np.ones((2, 5), np.uint8), 3))), "non-zero padding"),
        (mse_fields(norms=np.ones(2, np.float64)), "norms must be a float32 array, got float64"),
        (mse_fields(norms=np.ones(3, np.float32)), r"norms must have shape \[2\], got \[3\]"),
        (mse_fields(norms=np.array([1, np.nan], np.float32)), r"norms\[1\] is not finite"),
        (mse_fields(norms=np.array([1, -2], np.float32)), r"norms\[1\] is negative"),
    ],
)
def test_invalid_mse_batch_is_rejected_naming_the_problem(fields, match):
    with pytest.raises(BatchFormatError, match=match):
        BatchQuantizedMSE(**fields)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (prod_fields(bits=1), r"bits must be in \[2, 8\], got 1"),
        (
            prod_fields(codes=np.zeros((2, 3), np.uint8)),
            r"codes must have shape \[n, 2\] for dim=5 at 2 bits",
        ),
        (prod_fields(signs=None), "signs must be a uint8 array"),
        (prod_fields(signs=pack_signs(np.ones((3, 5), bool))), r"signs must have shape \[2, 1\]"),
        (
            prod_fields(signs=with_padding_bit(pack_signs(np.ones((2, 5), bool)))),
            "signs has non-zero padding",
        ),
        (prod_fields(gammas=None), "gammas must be a float32 array"),
        (prod_fields(gammas=np.array([1, np.inf], np.float32)), r"gammas\[1\] is not finite"),
        (prod_fields(gammas=np.array([-1, 1], np.float32)), r"gammas\[0\] is negative"),
    ],
)
def test_invalid_prod_batch_is_rejected_naming_the_problem(fields, match):
    with pytest.raises(BatchFormatError, match=match):
        BatchQuantizedProd(**fields)


# ---- corrupt files --------------------------------------------------------------------------


@pytest.fixture(params=["mse", "prod"])
def saved(request, tmp_path):
    path = tmp_path / "batch.safetensors"
    random_batch(request.param, 21, 3, 4, True, 7, "haar").save(path)  # rows end in padding bits
    return path


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1])
def test_a_truncated_file_is_rejected(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[: keep % len(data)])
    with pytest.raises(BatchFormatError, match="truncated"):
        BatchQuantizedMSE.load(saved)


def test_one_altered_byte_of_tensor_data_fails_the_checksum(saved):
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor of the data section
    saved.write_bytes(bytes(data))
    with pytest.raises(BatchFormatError, match="does not match its checksum"):
        BatchQuantizedMSE.load(saved)


@pytest.mark.parametrize("change", [{"dim": "22"}, {"seed": "8"}, {"rotation": "hadamard"}, {"bits": "4"}])
def test_edited_metadata_fails_the_checksum(saved, change):
    rewrite(saved, metadata=change)
    with pytest.raises(BatchFormatError, match="does not match its checksum"):
        BatchQuantizedMSE.load(saved)


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ({"dim": "21"}, r"codes must have shape \[n, 6\] for dim=21 at 2 bits, got \[4, 5\]"),
        ({"dim": "many"}, "malformed metadata"),
        ({"format": "tq.batch/0"}, "format is 'tq.batch/0', expected 'tq.batch/1'"),
        ({"kind": "lattice"}, "kind is 'lattice'"),
        ({"normalized": "false"}, "normalized=False but norms are present"),
        ({"rotation": "givens"}, "rotation must be one of"),
    ],
)
def test_a_file_inconsistent_with_its_metadata_is_rejected(tmp_path, metadata, match):
    # Written with a matching checksum, so that validation itself must find the problem.
    path = tmp_path / "prod.safetensors"
    random_batch("prod", 20, 3, 4, True, 7, "haar").save(path)
    rewrite(path, metadata=metadata, keep_checksum=False)
    with pytest.raises(BatchFormatError, match=match):
        BatchQuantizedMSE.load(path)


def test_a_file_with_non_zero_padding_bits_is_rejected(saved):
    codes = safetensors.numpy.load_file(saved)["codes"]
    rewrite(saved, tensors={"codes": with_padding_bit(codes)}, keep_checksum=False)
    with pytest.raises(BatchFormatError, match="codes has non-zero padding bits"):
        BatchQuantizedMSE.load(saved)


def test_a_prod_file_without_signs_is_rejected(tmp_path):
    path = tmp_path / "prod.safetensors"
    batch = random_batch("prod", 20, 3, 4, False, 7, "haar")
    metadata = {
        "format": "tq.batch/1", "kind": "prod", "dim": "20", "bits": "3", "seed": "7",
        "rotation": "haar", "normalized": "false",
    }  # fmt: skip
    save_tensors(path, {"codes": batch.codes, "gammas": batch.gammas}, metadata)
    with pytest.raises(BatchFormatError, match="no 'signs' tensor"):
        BatchQuantizedMSE.load(path)


def test_a_missing_file_is_rejected(tmp_path):
    with pytest.raises(BatchFormatError, match=r"missing\.safetensors: cannot read"):
        BatchQuantizedMSE.load(tmp_path / "missing.safetensors")


def test_a_file_that_is_not_safetensors_is_rejected(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_bytes((8).to_bytes(8, "little") + b"not json")
    with pytest.raises(BatchFormatError, match="corrupt safetensors header"):
        BatchQuantizedMSE.load(path)
