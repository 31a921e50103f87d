"""The exact model's run on a text, computed once and read by every cache-setting job.

A reference holds, for each of its sequences, the input tokens and the scored *targets*, and for
every target (one row each) what the quality metrics need of the exact run: the log-probability
of the target, the argmax and the next-token distribution over the whole vocabulary. A
quantized run is then compared with it row by row (:meth:`ExactReference.compare`) without
running the exact model again.

Two encodings of the distributions (``encoding``):

- ``float32``: the exact logits, float32 [rows, vocab] (for few rows: the prompt suite's
  baseline, whose logit RMSE needs raw logits).
- ``compact`` (about half the bytes): per row, the log-probabilities as uint16 codes of an
  affine map over [min, max] of the row (llama.cpp's KL-divergence file does the same), plus the
  :data:`TOP_EXACT` most likely entries in float32; decoded, the row is renormalized. Measured on
  SmolLM2-135M (512 rows, 2-bit cache): the largest per-row error of KL(exact || quantized)
  against the float64 computation from the logits was 6.7e-6 nats (mean 3e-8), below the
  1e-4 nats per token that :data:`KL_TOLERANCE` states and the tests check.

Files are checksummed safetensors written atomically (:mod:`tq.core.fileio`); ``config`` (JSON in the
metadata) says what was run, and :meth:`ExactReference.require` refuses a reference made for
other settings, naming the first key that differs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tq.core.fileio import TensorFileError, load_tensors, save_tensors
from tq.tasks.metrics import log_softmax

FORMAT = "tq-exact-reference/1"
ENCODINGS = ("compact", "float32")
# The largest error of a per-row KL(exact || quantized) that the compact encoding may add, nats.
KL_TOLERANCE = 1e-4
# Entries per row kept in float32 by the compact encoding (the most likely ones).
TOP_EXACT = 32
# Rows converted to float64 at a time (bounds the memory of a comparison).
_CHUNK_ROWS = 128
_CODE_MAX = np.iinfo(np.uint16).max
_COMMON = ("inputs", "input_offsets", "targets", "target_offsets", "target_logprobs", "argmax")
_ENCODED = {
    "float32": ("logits",),
    "compact": ("logprob_codes", "logprob_min", "logprob_step", "top_ids", "top_logprobs"),
}


class ReferenceError(ValueError):
    """A reference file is malformed, or was made for other settings than a job's."""


def _encode(logits: np.ndarray, encoding: str) -> dict[str, np.ndarray]:
    """One sequence's logits [rows, vocab] -> the tensors of ``encoding``."""
    if encoding == "float32":
        return {"logits": np.asarray(logits, np.float32)}
    log_probs = log_softmax(logits)
    # The map is stored in float32, so the codes are computed from the float32 values.
    low = log_probs.min(axis=1).astype(np.float32)
    step = (np.maximum(log_probs.max(axis=1) - low, 1e-30) / _CODE_MAX).astype(np.float32)
    codes = np.clip(np.rint((log_probs - low[:, None]) / step[:, None]), 0, _CODE_MAX).astype(np.uint16)
    k = min(TOP_EXACT, log_probs.shape[1])
    top = np.argpartition(-log_probs, k - 1, axis=1)[:, :k]
    return {
        "logprob_codes": codes,
        "logprob_min": low,
        "logprob_step": step,
        "top_ids": top.astype(np.int32),
        "top_logprobs": np.take_along_axis(log_probs, top, axis=1).astype(np.float32),
    }


@dataclass(frozen=True)
class ExactReference:
    """Exact-run data of ``sequences`` sequences; row r of the per-row arrays is target r.

    Attributes:
        inputs: int64 [total input tokens], every sequence's inputs one after another;
            sequence i's are inputs[input_offsets[i]:input_offsets[i + 1]].
        input_offsets: int64 [sequences + 1].
        targets: int64 [rows], the scored tokens; sequence i's rows are
            target_offsets[i]:target_offsets[i + 1].
        target_offsets: int64 [sequences + 1].
        target_logprobs: float32 [rows], exact log-probability of each target (nats).
        argmax: int64 [rows], the exact run's most likely token.
        encoded: the distributions (module docstring), per ``encoding``.
        encoding: "compact" or "float32".
        config: what was run (JSON-serializable), checked by :meth:`require`.
    """

    inputs: np.ndarray
    input_offsets: np.ndarray
    targets: np.ndarray
    target_offsets: np.ndarray
    target_logprobs: np.ndarray
    argmax: np.ndarray
    encoded: dict[str, np.ndarray]
    encoding: str
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ReferenceError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        rows = self.targets.shape[0]
        for name, offsets, total in (
            ("input_offsets", self.input_offsets, self.inputs.shape[0]),
            ("target_offsets", self.target_offsets, rows),
        ):
            if (
                offsets.ndim != 1
                or offsets.size < 2
                or offsets[0] != 0
                or offsets[-1] != total
                or np.any(np.diff(offsets) < 0)
            ):
                raise ReferenceError(f"{name} must rise from 0 to {total}, got {offsets.tolist()[:8]}")
        if self.input_offsets.size != self.target_offsets.size:
            raise ReferenceError(
                f"{self.input_offsets.size - 1} input sequences but "
                f"{self.target_offsets.size - 1} target ones"
            )
        for name in ("target_logprobs", "argmax"):
            if getattr(self, name).shape != (rows,):
                raise ReferenceError(f"{name} has shape {getattr(self, name).shape}, expected ({rows},)")
        missing = sorted(set(_ENCODED[self.encoding]) - set(self.encoded))
        if missing:
            raise ReferenceError(f"the {self.encoding} encoding needs tensors {missing}")
        for name in _ENCODED[self.encoding]:
            if self.encoded[name].shape[0] != rows:
                raise ReferenceError(f"{name} has {self.encoded[name].shape[0]} rows, expected {rows}")

    @classmethod
    def from_sequences(
        cls,
        sequences: Iterable[tuple[Sequence[int], Sequence[int], np.ndarray]],
        encoding: str,
        config: Mapping[str, Any],
    ) -> ExactReference:
        """Build from (inputs, targets [rows], exact logits [rows, vocab]) per sequence, where
        logits row t predicts targets[t]. Each sequence is encoded as it arrives, so a generator
        keeps only one sequence's logits in memory."""
        if encoding not in ENCODINGS:
            raise ReferenceError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        inputs, targets, target_logprobs, argmax, parts = [], [], [], [], []
        for tokens, scored, logits in sequences:
            scored = np.asarray(scored, np.int64)
            if logits.ndim != 2 or logits.shape[0] != scored.size:
                raise ReferenceError(
                    f"need logits [{scored.size}, vocab] for the targets, got {logits.shape}"
                )
            log_probs = log_softmax(logits)
            inputs.append(np.asarray(tokens, np.int64))
            targets.append(scored)
            target_logprobs.append(log_probs[np.arange(scored.size), scored].astype(np.float32))
            argmax.append(np.argmax(logits, axis=1).astype(np.int64))
            parts.append(_encode(logits, encoding))
        if not parts:
            raise ReferenceError("a reference needs at least one sequence")
        offsets = lambda arrays: np.cumsum([0] + [a.size for a in arrays]).astype(np.int64)  # noqa: E731
        return cls(
            inputs=np.concatenate(inputs),
            input_offsets=offsets(inputs),
            targets=np.concatenate(targets),
            target_offsets=offsets(targets),
            target_logprobs=np.concatenate(target_logprobs),
            argmax=np.concatenate(argmax),
            encoded={name: np.concatenate([part[name] for part in parts]) for name in parts[0]},
            encoding=encoding,
            config=json.loads(json.dumps(dict(config))),
        )

    @property
    def sequences(self) -> int:
        return self.input_offsets.size - 1

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of sequence ``index``."""
        if not 0 <= index < self.sequences:
            raise IndexError(f"sequence {index} out of range for a reference of {self.sequences}")
        return (
            self.inputs[self.input_offsets[index] : self.input_offsets[index + 1]],
            self.targets[self.rows(index)],
        )

    def rows(self, index: int) -> slice:
        """The rows of sequence ``index``."""
        return slice(int(self.target_offsets[index]), int(self.target_offsets[index + 1]))

    def log_probs(self, rows: slice) -> np.ndarray:
        """Exact next-token log-probabilities of ``rows``, float64 [len(rows), vocab]."""
        if self.encoding == "float32":
            return log_softmax(self.encoded["logits"][rows])
        codes = self.encoded["logprob_codes"][rows].astype(np.float64)
        decoded = self.encoded["logprob_min"][rows, None] + codes * self.encoded["logprob_step"][rows, None]
        np.put_along_axis(decoded, self.encoded["top_ids"][rows], self.encoded["top_logprobs"][rows], axis=1)
        return log_softmax(decoded)

    def logits(self, rows: slice) -> np.ndarray:
        """The exact logits of ``rows``, float32 [len(rows), vocab] (``float32`` encoding only)."""
        if self.encoding != "float32":
            raise ReferenceError("a compact reference keeps log-probabilities, not the raw logits")
        return self.encoded["logits"][rows]

    def compare(self, index: int, quantized_logits: np.ndarray) -> dict[str, np.ndarray]:
        """Per-token quality of a quantized run on sequence ``index``.

        Args:
            quantized_logits: [rows of the sequence, vocab], row t predicting target t.

        Returns:
            float64 [rows] arrays ``exact_nll``, ``quantized_nll``, ``kl`` (KL(exact ||
            quantized), nats), ``delta_p`` (quantized - exact probability of the target) and
            bool ``top1_match``: the fields of :func:`tq.tasks.stats.quality_summary`.
        """
        rows = self.rows(index)
        count = rows.stop - rows.start
        if quantized_logits.ndim != 2 or quantized_logits.shape[0] != count:
            raise ValueError(
                f"sequence {index} has {count} scored rows; got quantized logits {quantized_logits.shape}"
            )
        targets = self.targets[rows]
        exact_logprob = self.target_logprobs[rows].astype(np.float64)
        kl = np.empty(count)
        quantized_logprob = np.empty(count)
        for start in range(0, count, _CHUNK_ROWS):
            part = slice(start, min(start + _CHUNK_ROWS, count))
            log_q = log_softmax(quantized_logits[part])
            log_p = self.log_probs(slice(rows.start + part.start, rows.start + part.stop))
            if log_p.shape != log_q.shape:
                raise ValueError(
                    f"vocabulary of the reference {log_p.shape[1]}, of the logits {log_q.shape[1]}"
                )
            kl[part] = np.sum(np.exp(log_p) * (log_p - log_q), axis=1)
            quantized_logprob[part] = log_q[np.arange(log_q.shape[0]), targets[part]]
        return {
            "exact_nll": -exact_logprob,
            "quantized_nll": -quantized_logprob,
            "kl": kl,
            "top1_match": np.argmax(quantized_logits, axis=1) == self.argmax[rows],
            "delta_p": np.exp(quantized_logprob) - np.exp(exact_logprob),
        }

    def require(self, **expected: Any) -> None:
        """Refuse a reference whose ``config`` differs from ``expected`` in any given key."""
        for key, value in expected.items():
            have = self.config.get(key)
            if json.loads(json.dumps(value)) != have:
                raise ReferenceError(
                    f"the exact reference was made for {key}={have!r}, this job needs {key}={value!r}"
                )

    def save(self, path: str | os.PathLike) -> None:
        """Write as a checksummed safetensors file, atomically."""
        tensors = {name: getattr(self, name) for name in _COMMON} | self.encoded
        metadata = {"format": FORMAT, "encoding": self.encoding, "config": json.dumps(self.config)}
        save_tensors(path, tensors, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExactReference:
        """Load and validate a reference file.

        Raises:
            ReferenceError: the file is missing, truncated, altered, of another format or
                malformed (the message names the file and the problem).
        """
        try:
            tensors, metadata = load_tensors(path)
        except TensorFileError as error:
            raise ReferenceError(str(error)) from None
        if metadata.get("format") != FORMAT:
            raise ReferenceError(f"{path}: format is {metadata.get('format')!r}, expected {FORMAT!r}")
        encoding = metadata.get("encoding")
        if encoding not in ENCODINGS:
            raise ReferenceError(f"{path}: encoding {encoding!r} is not one of {ENCODINGS}")
        expected = set(_COMMON) | set(_ENCODED[encoding])
        if set(tensors) != expected:
            raise ReferenceError(
                f"{path}: tensors {sorted(tensors)} do not match the {encoding} encoding's {sorted(expected)}"
            )
        try:
            config = json.loads(metadata.get("config", ""))
        except json.JSONDecodeError as error:
            raise ReferenceError(f"{path}: config metadata is not JSON ({error})") from None
        try:
            return cls(
                **{name: tensors[name] for name in _COMMON},
                encoded={name: tensors[name] for name in _ENCODED[encoding]},
                encoding=encoding,
                config=config,
            )
        except ReferenceError as error:
            raise ReferenceError(f"{path}: {error}") from None
