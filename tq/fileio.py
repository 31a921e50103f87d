"""Atomic file writes, JSON results and checksummed safetensors files.

Every artifact is written to a temporary file in the target directory and renamed into place,
so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

CHECKSUM_KEY = "sha256"


class TensorFileError(ValueError):
    """A safetensors file is missing, truncated, altered or inconsistent."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def tensors_checksum(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order, then over the
    metadata (every key but the checksum's own), so that an edited header is caught too."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    if metadata:
        items = sorted((key, value) for key, value in metadata.items() if key != CHECKSUM_KEY)
        digest.update(json.dumps(items).encode())
    return digest.hexdigest()


def _sorted_metadata(data: bytes) -> bytes:
    """Rewrite a safetensors file's header with its metadata keys sorted.

    safetensors writes the metadata map in a random order, so two saves of the same batch would
    differ in bytes; sorted, the same tensors and metadata always give the same file. The header
    stays space-padded to a multiple of 8 bytes, as safetensors writes it.
    """
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + header_size :]


def save_tensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Save tensors and string metadata as safetensors, with a checksum, atomically.

    The same tensors and metadata always give a byte-identical file.
    """
    contiguous = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    meta = dict(metadata)
    meta[CHECKSUM_KEY] = tensors_checksum(contiguous, meta)
    atomic_write_bytes(path, _sorted_metadata(safetensors.numpy.save(contiguous, metadata=meta)))


def _read_metadata(data: bytes, path: Path) -> dict[str, str]:
    if len(data) < 8:
        raise TensorFileError(f"{path}: truncated ({len(data)} bytes, no safetensors header)")
    header_size = int.from_bytes(data[:8], "little")
    if header_size > len(data) - 8:
        raise TensorFileError(
            f"{path}: truncated (header says {header_size} bytes, file has {len(data) - 8})"
        )
    try:
        header = json.loads(data[8 : 8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TensorFileError(f"{path}: corrupt safetensors header ({error})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise TensorFileError(f"{path}: no metadata in the safetensors header")
    needed = 0
    for entry in header.values():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if isinstance(offsets, list) and len(offsets) == 2 and isinstance(offsets[1], int):
            needed = max(needed, offsets[1])
    available = len(data) - 8 - header_size
    if needed > available:
        raise TensorFileError(f"{path}: truncated (tensor data needs {needed} bytes, file has {available})")
    return metadata


def load_tensors(
    path: str | os.PathLike, require_checksum: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Load a file written by :func:`save_tensors`; verify its checksum. With
    ``require_checksum=False`` a safetensors file written by another tool, without a checksum,
    loads too (a checksum that is present is still verified).

    Raises:
        TensorFileError: the file is missing, truncated, not safetensors, or its data does
            not match the checksum stored with it (or has none, when one is required).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TensorFileError(f"{path}: cannot read ({error.strerror})") from None
    metadata = _read_metadata(data, path)
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as error:  # safetensors raises its own exception types
        raise TensorFileError(f"{path}: not a valid safetensors file ({error})") from None
    expected = metadata.get(CHECKSUM_KEY)
    if expected is None:
        if not require_checksum:
            return tensors, metadata
        raise TensorFileError(f"{path}: no {CHECKSUM_KEY} checksum in the metadata")
    if tensors_checksum(tensors, metadata) != expected:
        raise TensorFileError(f"{path}: the tensor data or metadata does not match its checksum (altered?)")
    return tensors, metadata
