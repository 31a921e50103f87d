"""Cached artifacts are verified when read: a codebook or corpus cache file that fails is rebuilt
and rewritten with a CacheWarning naming it, never used; a bundle whose files do not match
bundle.json's manifest, or a tq trace without its checksum, is refused naming the file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from tq.core.codebook import lloyd_max_codebook, solve_codebook
from tq.core.fileio import CacheWarning, json_checksum, read_checked_json, write_checked_json
from tq.data.trace import FORMAT, KvTrace, TraceFormatError
from tq.models.bundle import BUNDLE_JSON, MODEL_ONNX_DATA, TOKENIZER_JSON, BundleError, ModelBundle
from tq.models.prepare import prepare_bundle

# --- Codebooks ---------------------------------------------------------------------------------

DIM, BITS = 16, 3
# D_mse of the d = 16, b = 3 codebook (between the d = 64 table's 0.0334 and 4^-3 = 0.0156).
D16_B3_RANGE = (0.02, 0.034)


@pytest.fixture
def codebook_file(tmp_path, monkeypatch) -> Path:
    """The disk cache's d = 16, b = 3 codebook, solved into a private cache directory."""
    monkeypatch.setenv("TQ_CACHE_DIR", str(tmp_path))
    lloyd_max_codebook.cache_clear()
    lloyd_max_codebook(DIM, BITS)
    lloyd_max_codebook.cache_clear()
    yield tmp_path / "codebooks" / f"lloyd-max-d{DIM}-b{BITS}.json"
    lloyd_max_codebook.cache_clear()


def _swap_and_310(data: dict) -> None:
    """The issue's report: two centroids swapped and one set to 310 (D_mse 276,251 when used)."""
    c = data["centroids"]
    c[1], c[2] = c[2], c[1]
    c[5] = 310.0


def _set(key: str, value) -> Callable[[dict], None]:
    return lambda data: data.__setitem__(key, value)


def _centroids(edit: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict], None]:
    return lambda data: data.__setitem__("centroids", edit(np.array(data["centroids"])).tolist())


def _scale_distortion(data: dict) -> None:
    data["distortion"] *= 1.001


def _nudge_one(c: np.ndarray) -> np.ndarray:
    c[-1] *= 1.001
    return c


TAMPERED = {
    "swapped, one at 310": (_swap_and_310, "centroid 5 is 310.0, outside"),
    "swapped": (_centroids(lambda c: c[[0, 2, 1, 3, 4, 5, 6, 7]]), "centroids 1 and 2 are not increasing"),
    "one centroid too few": (_centroids(lambda c: c[1:]), "7 centroids, expected 2\\^3 = 8"),
    "not symmetric": (_centroids(_nudge_one), "centroids are not symmetric about 0"),
    "not the Lloyd-Max solution": (
        _centroids(lambda c: 1.01 * c),
        "not a Lloyd-Max solution \\(a centroid is",
    ),
    "another dimension's codebook": (_set("dim", 17), "holds d=17, b=3, its name says d=16, b=3"),
    "wrong distortion": (_scale_distortion, "but the centroids give"),
    "distortion NaN": (_set("distortion", float("nan")), "distortion nan is not a finite number"),
    "old format": (_set("format", "tq.codebook/1"), "format 'tq.codebook/1'"),
    "centroids not numbers": (_set("centroids", {"a": 1}), "not a list of numbers"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_codebook_with_a_valid_checksum_but_broken_invariants_is_solved_again(codebook_file, case):
    edit, message = TAMPERED[case]
    data = read_checked_json(codebook_file)
    edit(data)
    write_checked_json(codebook_file, data)  # a valid checksum: only the invariants can tell
    with pytest.warns(
        CacheWarning, match=rf"{codebook_file.name}: .*{message}.*; solving the codebook again"
    ):
        codebook = lloyd_max_codebook(DIM, BITS)
    assert codebook.iterations > 0  # solved, not read
    assert D16_B3_RANGE[0] < codebook.distortion < D16_B3_RANGE[1]
    np.testing.assert_array_equal(codebook.centroids, solve_codebook(DIM, BITS).centroids)
    lloyd_max_codebook.cache_clear()
    assert lloyd_max_codebook(DIM, BITS).iterations == 0  # rewritten: read back without a warning


def test_an_edited_codebook_file_fails_its_checksum(codebook_file):
    text = codebook_file.read_text()
    first = json.loads(text)["centroids"][0]
    codebook_file.write_text(text.replace(repr(first), repr(first * 1.0000001), 1))
    with pytest.warns(CacheWarning, match=f"{codebook_file.name}: the content does not match its sha256"):
        assert lloyd_max_codebook(DIM, BITS).iterations > 0


def test_a_codebook_file_without_a_checksum_is_solved_again(codebook_file):
    data = read_checked_json(codebook_file)
    del data["sha256"]
    codebook_file.write_text(json.dumps(data))
    with pytest.warns(CacheWarning, match=f"{codebook_file.name}: no sha256 checksum"):
        assert lloyd_max_codebook(DIM, BITS).iterations > 0


def test_every_solved_codebook_verifies(tmp_path, monkeypatch, recwarn):
    """No false alarms: codebooks across the range of d and b read back from the disk cache."""
    monkeypatch.setenv("TQ_CACHE_DIR", str(tmp_path))
    cases = [(2, 1), (2, 8), (3, 8), (5, 4), (64, 4), (128, 8), (1000, 6), (4096, 1), (4096, 8)]
    for dim, bits in cases:
        lloyd_max_codebook.cache_clear()
        lloyd_max_codebook(dim, bits)
    for dim, bits in cases:
        lloyd_max_codebook.cache_clear()
        assert lloyd_max_codebook(dim, bits).iterations == 0, (dim, bits)
    lloyd_max_codebook.cache_clear()
    assert not [w for w in recwarn if issubclass(w.category, CacheWarning)]


# --- The corpus text: tests/test_corpus.py checks its cache (edited, stale or malformed files).


# --- Bundles -----------------------------------------------------------------------------------


def _flip_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))


def test_bundle_json_carries_a_manifest_and_its_checksum(bundle_copy):
    info = json.loads((bundle_copy / BUNDLE_JSON).read_text())
    assert info["sha256"] == json_checksum(info)
    assert info["files"][MODEL_ONNX_DATA]["bytes"] == (bundle_copy / MODEL_ONNX_DATA).stat().st_size
    assert set(info["files"]) >= {"model.onnx", MODEL_ONNX_DATA, TOKENIZER_JSON, "config.json"}


def test_an_edited_bundle_json_is_refused(bundle_copy):
    file = bundle_copy / BUNDLE_JSON
    file.write_text(file.read_text().replace('"kv_heads": 2', '"kv_heads": 1'))
    with pytest.raises(BundleError, match=f"{file}: the content does not match its sha256 checksum"):
        ModelBundle.load(bundle_copy)


def test_a_bundle_json_without_a_checksum_is_refused(bundle_copy):
    file = bundle_copy / BUNDLE_JSON
    info = json.loads(file.read_text())
    del info["sha256"]
    file.write_text(json.dumps(info))
    with pytest.raises(BundleError, match=r"no sha256 checksum .*prepare the bundle again"):
        ModelBundle.load(bundle_copy)


def test_an_altered_tokenizer_is_refused_on_load(bundle_copy):
    _flip_last_byte(bundle_copy / TOKENIZER_JSON)
    with pytest.raises(BundleError, match=f"{bundle_copy / TOKENIZER_JSON}: altered"):
        ModelBundle.load(bundle_copy)


def test_truncated_weights_are_refused_on_load(bundle_copy):
    with open(bundle_copy / MODEL_ONNX_DATA, "r+b") as f:
        f.truncate((bundle_copy / MODEL_ONNX_DATA).stat().st_size - 4)
    with pytest.raises(BundleError, match=f"{MODEL_ONNX_DATA}: truncated or altered"):
        ModelBundle.load(bundle_copy)


def test_altered_weights_are_found_by_a_full_check(bundle_copy, monkeypatch):
    """Weights above HASH_ON_LOAD_BYTES are checked by size on load and hashed by a full check;
    the tiny model's weights are small, so the limit is lowered to make them "large"."""
    from tq.models import bundle as bundle_module

    monkeypatch.setattr(bundle_module, "HASH_ON_LOAD_BYTES", 1024)
    assert (bundle_copy / MODEL_ONNX_DATA).stat().st_size > 1024
    _flip_last_byte(bundle_copy / MODEL_ONNX_DATA)
    ModelBundle.load(bundle_copy)  # same size: not hashed on an ordinary load
    with pytest.raises(BundleError, match=f"{MODEL_ONNX_DATA}: altered"):
        ModelBundle.load(bundle_copy, full_check=True)


def test_prepare_rebuilds_a_bundle_whose_weights_do_not_verify(bundle_copy, capsys):
    _flip_last_byte(bundle_copy / MODEL_ONNX_DATA)
    prepare_bundle("tiny-llama", out=bundle_copy)
    assert f"not reusing {bundle_copy}: {bundle_copy / MODEL_ONNX_DATA}: altered" in capsys.readouterr().err
    ModelBundle.load(bundle_copy, full_check=True)


# --- Traces ------------------------------------------------------------------------------------


def test_a_tq_trace_without_its_checksum_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "keys": rng.standard_normal((1, 4, 8)).astype(np.float32),
        "values": rng.standard_normal((1, 4, 8)).astype(np.float32),
        "queries": rng.standard_normal((1, 1, 8)).astype(np.float32),
        "query_positions": np.array([[3]], np.int64),
    }
    metadata = {"format": FORMAT, "model": "m", "layer": "0", "head": "0", "rope": "post", "note": ""}
    path = tmp_path / "trace.safetensors"
    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(TraceFormatError, match=f"{path}: a tq.trace/1 file without its sha256 checksum"):
        KvTrace.load(path)
    del metadata["format"]  # a foreign trace (another tool's) needs none
    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)
    assert KvTrace.load(path).samples == 1
