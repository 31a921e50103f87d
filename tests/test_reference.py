"""The exact reference: encodings, comparison, files (tq.tasks.exact_run)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tq.tasks.exact_run import KL_TOLERANCE, ExactReference, ReferenceError
from tq.tasks.metrics import log_softmax

SETTINGS = {"workload": "test", "model": "random", "windows": 2}


def _logits(rows: int, vocab: int = 3000, seed: int = 0) -> np.ndarray:
    """Logits shaped like a language model's: a heavy tail and, on some rows, one or a few
    tokens far ahead (confident predictions)."""
    rng = np.random.default_rng(seed)
    logits = 3.0 * rng.standard_normal((rows, vocab))
    confident = rng.random(rows) < 0.5
    logits[confident, rng.integers(0, vocab, confident.sum())] += rng.uniform(10, 25, confident.sum())
    logits[:, :5] += rng.uniform(0, 8, (rows, 5))
    return logits.astype(np.float32)


def _reference(encoding: str, lengths=(40, 25), seed: int = 0) -> tuple[ExactReference, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    logits = [_logits(n, seed=seed + i) for i, n in enumerate(lengths)]
    sequences = [
        (rng.integers(0, 3000, 10 + i), rng.integers(0, 3000, part.shape[0]), part)
        for i, part in enumerate(logits)
    ]
    return ExactReference.from_sequences(iter(sequences), encoding, SETTINGS), logits


def _full_kl(exact: np.ndarray, quantized: np.ndarray) -> np.ndarray:
    log_p, log_q = log_softmax(exact), log_softmax(quantized)
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=1)


@pytest.mark.parametrize("noise", [0.05, 0.5, 3.0])
def test_compact_kl_is_within_tolerance_of_the_full_computation(noise):
    reference, logits = _reference("compact")
    rng = np.random.default_rng(1)
    for index, exact in enumerate(logits):
        quantized = exact + noise * rng.standard_normal(exact.shape).astype(np.float32)
        kl = reference.compare(index, quantized)["kl"]
        assert np.abs(kl - _full_kl(exact, quantized)).max() < KL_TOLERANCE


def test_float32_encoding_is_exact_and_keeps_the_logits():
    reference, logits = _reference("float32")
    np.testing.assert_array_equal(reference.logits(reference.rows(1)), logits[1])
    quantized = logits[1] + 0.3
    np.testing.assert_allclose(reference.compare(1, quantized)["kl"], 0.0, atol=1e-12)
    compact, _ = _reference("compact")
    with pytest.raises(ReferenceError, match="not the raw logits"):
        compact.logits(compact.rows(0))


@pytest.mark.parametrize("encoding", ["compact", "float32"])
def test_comparing_the_exact_run_with_itself(encoding):
    reference, logits = _reference(encoding)
    values = reference.compare(0, logits[0])
    np.testing.assert_allclose(values["kl"], 0.0, atol=KL_TOLERANCE)
    np.testing.assert_allclose(values["quantized_nll"], values["exact_nll"], atol=1e-5)
    np.testing.assert_allclose(values["delta_p"], 0.0, atol=1e-5)
    assert values["top1_match"].all()
    targets = reference.sequence(0)[1]
    expected = -log_softmax(logits[0])[np.arange(len(targets)), targets]
    np.testing.assert_allclose(values["exact_nll"], expected, rtol=1e-6)


@pytest.mark.parametrize("encoding", ["compact", "float32"])
def test_save_and_load_round_trip(tmp_path, encoding):
    reference, _ = _reference(encoding)
    path = tmp_path / "reference.safetensors"
    reference.save(path)
    loaded = ExactReference.load(path)
    assert loaded.encoding == encoding and loaded.config == SETTINGS and loaded.sequences == 2
    for name in ("inputs", "targets", "target_logprobs", "argmax"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(reference, name))
    np.testing.assert_array_equal(loaded.log_probs(loaded.rows(1)), reference.log_probs(reference.rows(1)))


def test_a_damaged_or_foreign_file_is_refused(tmp_path):
    reference, _ = _reference("compact", lengths=(4,))
    path = tmp_path / "reference.safetensors"
    reference.save(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ReferenceError, match="checksum"):
        ExactReference.load(path)
    with pytest.raises(ReferenceError, match="cannot read"):
        ExactReference.load(tmp_path / "missing.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ReferenceError, match="truncated"):
        ExactReference.load(path)


def test_a_reference_for_other_settings_is_refused():
    reference, _ = _reference("compact", lengths=(4,))
    reference.require(workload="test", windows=2)
    with pytest.raises(ReferenceError, match="made for windows=2, this job needs windows=8"):
        reference.require(windows=8)


def test_malformed_inputs_are_refused():
    logits = _logits(3)
    with pytest.raises(ReferenceError, match="need logits"):
        ExactReference.from_sequences([([1, 2], [1, 2, 3, 4], logits)], "compact", SETTINGS)
    with pytest.raises(ReferenceError, match="encoding must be one of"):
        ExactReference.from_sequences([([1, 2], [1, 2, 3], logits)], "float16", SETTINGS)
    with pytest.raises(ReferenceError, match="at least one sequence"):
        ExactReference.from_sequences([], "compact", SETTINGS)
    reference, _ = _reference("compact")
    with pytest.raises(ValueError, match="has 25 scored rows"):
        reference.compare(1, logits)
    with pytest.raises(IndexError, match="out of range"):
        reference.sequence(2)
    assert json.loads(json.dumps(reference.config)) == SETTINGS
