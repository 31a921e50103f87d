"""Per-head KV traces: the keys, values and queries of one attention head over a set of prompts.

A :class:`KvTrace` holds, for one (layer, KV head) of one model, ``samples`` prompts of ``seq``
tokens each (every prompt cut to the same length, so the arrays are rectangular; see
:func:`tq.tasks.trace_export.export_traces`), the keys and values exactly as the model's KV cache holds
them, and some queries with the position of each query's token. A query at position p attends to
keys 0..p, and its attention logits are ``q . k / sqrt(head_dim)``.

File format (docs/design.md section 4): a checksummed safetensors file (:mod:`tq.core.fileio`) with tensors
``keys``, ``values`` float32 [samples, seq, head_dim], ``queries`` float32
[samples, n_queries, head_dim], ``query_positions`` int64 [samples, n_queries], and string
metadata ``format`` ("tq.trace/1"), ``model``, ``layer``, ``head``, ``rope``, ``note``.
Traces are validated when built and when loaded; the first problem is named in a
:class:`TraceFormatError`.

Files written by other tools (the reference crate's exporter: the four tensors and ``model``,
``layer``, ``head`` metadata, no checksum, no ``format``) load too: the checksum is verified when
present, and required when the file has a ``format`` key (tq wrote it); without a ``format`` key,
``rope`` defaults to "post" and ``note`` to "", float tensors are read as float32 and integer
positions as int64 (unsigned positions beyond int64 are refused as out of range, not wrapped to
negative numbers), and a single-sample file (keys [seq, head_dim], positions [n_queries]) gains
its samples axis. Every structural check still applies.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from tq.core.fileio import CHECKSUM_KEY, TensorFileError, load_tensors, save_tensors

FORMAT = "tq.trace/1"

# "post": keys after the rotary embedding, as a KV cache holds them; "none": a model without RoPE.
ROPE_KINDS = ("post", "none")

_TENSORS = ("keys", "values", "queries", "query_positions")


def _refuse_wrapping_positions(positions: np.ndarray, keys: np.ndarray) -> None:
    """Refuse unsigned positions beyond int64 (>= any seq length) before they are cast to int64,
    where they would wrap to negative numbers and be reported as such."""
    limit = np.iinfo(np.int64).max
    if positions.dtype.kind != "u" or not positions.size or positions.max() <= limit:
        return
    index = np.unravel_index(int(np.argmax(positions > limit)), positions.shape)
    where = ", ".join(str(int(i)) for i in index)
    seq = f" ({keys.shape[-2]})" if keys.ndim >= 2 else ""
    raise TraceFormatError(f"query_positions[{where}] = {int(positions[index])} is >= seq{seq}")


def _foreign_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Another tool's trace tensors in this format's dtypes and ranks (see the module docstring)."""
    out = {}
    for name, array in tensors.items():
        if name == "query_positions" and np.issubdtype(array.dtype, np.integer):
            _refuse_wrapping_positions(array, tensors["keys"])
            array = array.astype(np.int64)
        elif name != "query_positions" and np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)
        out[name] = array
    if out["keys"].ndim == 2 and out["query_positions"].ndim == 1:  # one sample
        out = {name: array[None] for name, array in out.items()}
    return out


class TraceFormatError(ValueError):
    """A trace (in memory or in a file) is malformed; the message names the first problem."""


def _check_array(name: str, array: object, dtype: type, ndim: int) -> np.ndarray:
    if not isinstance(array, np.ndarray) or array.dtype != dtype:
        got = getattr(array, "dtype", type(array).__name__)
        raise TraceFormatError(f"{name} must be a {np.dtype(dtype).name} array, got {got}")
    if array.ndim != ndim:
        raise TraceFormatError(f"{name} must have {ndim} dimensions, got shape {list(array.shape)}")
    return array


def _check_finite(name: str, array: np.ndarray) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        index = np.unravel_index(int(np.argmin(finite)), array.shape)
        where = ", ".join(str(int(i)) for i in index)
        raise TraceFormatError(f"{name}[{where}] is not finite ({array[index]})")


@dataclass(frozen=True, eq=False)
class KvTrace:
    """Keys, values and queries of one attention head of one model, over ``samples`` prompts.

    Attributes:
        keys: float32 [samples, seq, head_dim], keys as the KV cache holds them (after RoPE
            where the model uses it).
        values: float32 [samples, seq, head_dim], values as the KV cache holds them.
        queries: float32 [samples, n_queries, head_dim], queries as the attention sees them
            (after RoPE), scaled so that a logit is ``q . k / sqrt(head_dim)``.
        query_positions: int64 [samples, n_queries], the position in the sequence of each
            query's token, in [0, seq); the query attends to keys 0..position.
        model: the model's name.
        layer: the decoder layer (0-based).
        head: the KV head within the layer (0-based; with grouped-query attention, an index
            among the key/value heads, not the query heads).
        rope: "post" for keys after the rotary embedding, "none" for models without RoPE.
        note: free text on how the trace was made (truncation, query head, ...).
    """

    keys: np.ndarray
    values: np.ndarray
    queries: np.ndarray
    query_positions: np.ndarray
    model: str
    layer: int
    head: int
    rope: str
    note: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`TraceFormatError` naming the first problem: metadata, dtypes, shapes,
        non-finite numbers, or query positions outside [0, seq)."""
        for name in ("model", "note"):
            if not isinstance(getattr(self, name), str):
                raise TraceFormatError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("layer", "head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise TraceFormatError(f"{name} must be a non-negative integer, got {value!r}")
        if self.rope not in ROPE_KINDS:
            raise TraceFormatError(f"rope must be one of {ROPE_KINDS}, got {self.rope!r}")
        keys = _check_array("keys", self.keys, np.float32, 3)
        samples, seq, head_dim = keys.shape
        if seq < 1 or head_dim < 1:
            raise TraceFormatError(f"keys must have seq >= 1 and head_dim >= 1, got shape {list(keys.shape)}")
        values = _check_array("values", self.values, np.float32, 3)
        if values.shape != keys.shape:
            raise TraceFormatError(
                f"values must have the shape of keys {list(keys.shape)}, got {list(values.shape)}"
            )
        queries = _check_array("queries", self.queries, np.float32, 3)
        if queries.shape[0] != samples or queries.shape[2] != head_dim or queries.shape[1] < 1:
            raise TraceFormatError(
                f"queries must have shape [{samples}, n_queries >= 1, {head_dim}], got {list(queries.shape)}"
            )
        positions = _check_array("query_positions", self.query_positions, np.int64, 2)
        if positions.shape != queries.shape[:2]:
            raise TraceFormatError(
                f"query_positions must have shape {list(queries.shape[:2])}, got {list(positions.shape)}"
            )
        for name, array in (("keys", keys), ("values", values), ("queries", queries)):
            _check_finite(name, array)
        bad = (positions < 0) | (positions >= seq)
        if bad.any():
            sample, query = (int(i) for i in np.argwhere(bad)[0])
            value = int(positions[sample, query])
            problem = "is negative" if value < 0 else f"is >= seq ({seq})"
            raise TraceFormatError(f"query_positions[{sample}, {query}] = {value} {problem}")

    @property
    def samples(self) -> int:
        """Number of prompts."""
        return self.keys.shape[0]

    @property
    def seq_len(self) -> int:
        """Tokens per prompt (the same for every prompt)."""
        return self.keys.shape[1]

    @property
    def head_dim(self) -> int:
        """Dimension of each key, value and query vector."""
        return self.keys.shape[2]

    @property
    def n_queries(self) -> int:
        """Queries per prompt."""
        return self.queries.shape[1]

    def __len__(self) -> int:
        return self.samples

    def _take(self, index: slice | np.ndarray) -> KvTrace:
        return replace(
            self,
            keys=self.keys[index],
            values=self.values[index],
            queries=self.queries[index],
            query_positions=self.query_positions[index],
        )

    def __getitem__(self, index: int | slice) -> KvTrace:
        """``trace[i]``: a trace of the one sample i; ``trace[a:b]``: the samples a..b-1.

        The arrays are views of this trace's arrays; the metadata is the same.
        """
        if isinstance(index, slice):
            return self._take(index)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"a trace is indexed by an integer or a slice, got {type(index).__name__}")
        if not -self.samples <= index < self.samples:
            raise IndexError(f"sample {index} out of range for a trace of {self.samples} samples")
        start = int(index) % self.samples
        return self._take(slice(start, start + 1))

    def select(self, indices: Sequence[int] | np.ndarray) -> KvTrace:
        """A trace of the samples at ``indices`` (in that order, repeats allowed; copies)."""
        index = np.asarray(indices)
        if index.ndim != 1 or (index.size and not np.issubdtype(index.dtype, np.integer)):
            raise TypeError(f"select takes a 1-D sequence of integers, got {indices!r}")
        out_of_range = index >= self.samples  # before the cast: a large unsigned index would wrap
        if index.dtype.kind == "i":
            out_of_range |= index < -self.samples
        if out_of_range.any():
            raise IndexError(
                f"sample {int(index[out_of_range][0])} out of range for a trace of {self.samples} samples"
            )
        return self._take(index.astype(np.int64))

    def save(self, path: str | os.PathLike) -> None:
        """Write the trace as a checksummed safetensors file, atomically."""
        metadata = {
            "format": FORMAT,
            "model": self.model,
            "layer": str(int(self.layer)),
            "head": str(int(self.head)),
            "rope": self.rope,
            "note": self.note,
        }
        save_tensors(path, {name: getattr(self, name) for name in _TENSORS}, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> KvTrace:
        """Load and validate a trace file.

        Raises:
            TraceFormatError: the file is missing, truncated, altered, of another format, or
                its content is malformed (the message names the file and the first problem).
        """
        try:
            tensors, metadata = load_tensors(path, require_checksum=False)
        except TensorFileError as error:
            raise TraceFormatError(str(error)) from None
        foreign = "format" not in metadata
        if not foreign and metadata["format"] != FORMAT:
            raise TraceFormatError(f"{path}: format is {metadata.get('format')!r}, expected {FORMAT!r}")
        if not foreign and CHECKSUM_KEY not in metadata:
            raise TraceFormatError(f"{path}: a {FORMAT} file without its {CHECKSUM_KEY} checksum (altered?)")
        for name in _TENSORS:
            if name not in tensors:
                raise TraceFormatError(f"{path}: no {name!r} tensor")
        extra = sorted(set(tensors) - set(_TENSORS))
        if extra:
            raise TraceFormatError(f"{path}: unexpected tensors {extra}")
        if foreign:
            metadata = {"rope": "post", "note": ""} | metadata
        try:
            header = {name: metadata[name] for name in ("model", "rope", "note")}
            index = {name: int(metadata[name]) for name in ("layer", "head")}
        except (KeyError, ValueError) as error:
            raise TraceFormatError(f"{path}: missing or malformed metadata ({error})") from None
        try:
            if foreign:
                tensors = _foreign_tensors(tensors)
            return cls(**{name: tensors[name] for name in _TENSORS}, **header, **index)
        except TraceFormatError as error:
            raise TraceFormatError(f"{path}: {error}") from None
