"""Atomic file writes, JSON results, checksummed JSON and checksummed safetensors files.

Every artifact is written to a temporary file in the target directory and renamed into place,
so a crash never leaves a half-written file under the final name. The file gets the mode a plain
``open()`` would give it under the process umask (0o666 & ~umask), not ``mkstemp``'s 0o600, so
results on a shared file system are readable by the group's other jobs and users.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

CHECKSUM_KEY = "sha256"
_UMASK_LOCK = threading.Lock()
_PROC_STATUS = "/proc/self/status"  # Linux: holds the process umask ("Umask:\t0022")


class TensorFileError(ValueError):
    """A safetensors file is missing, truncated, altered or inconsistent."""


class CacheWarning(UserWarning):
    """A cached file did not verify: it is rebuilt, never used (the message names the file)."""


class ChecksumError(ValueError):
    """A checksummed JSON file is not a JSON object, has no checksum, or does not match it."""


def process_umask() -> int:
    """The process umask, read on each call (a program may change it after import).

    On Linux it is read from ``/proc/self/status``, without side effects. Elsewhere ``os.umask``
    is the only way, and it sets the mask while reading it: it is set to 0o077 and restored under
    a lock, so a file another thread creates in that instant is private rather than open to all.
    """
    try:
        with open(_PROC_STATUS, encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def umask_mode(directory: bool = False) -> int:
    """The permission bits a new file (0o666) or directory (0o777) gets under the process umask:
    what ``open()`` or ``mkdir()`` would give it, for files that ``mkstemp``/``mkdtemp`` create
    private (0o600 / 0o700) before they are renamed into place."""
    return (0o777 if directory else 0o666) & ~process_umask()


def apply_umask(root: str | os.PathLike) -> None:
    """Give the directory ``root`` and everything under it the modes ``mkdir()`` and ``open()``
    would have given them under the process umask (:func:`umask_mode`): for trees built in a
    ``mkdtemp`` directory (0o700) by tools that write some files private (ONNX's external data
    file is 0o600), before they are renamed into place."""
    root = Path(root)
    root.chmod(umask_mode(directory=True))
    for entry in root.rglob("*"):
        if not entry.is_symlink():
            entry.chmod(umask_mode(directory=entry.is_dir()))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename; the file's mode is
    :func:`umask_mode` (0o644 under the usual umask 022)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), umask_mode())
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


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def json_checksum(obj: dict[str, Any]) -> str:
    """SHA-256 (hex) of ``obj``'s canonical JSON (sorted keys, no spaces), every key but
    ``sha256`` itself. A float survives the JSON round trip exactly, so a file read back gives
    the same checksum."""
    body = {key: value for key, value in obj.items() if key != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_checked_json(path: str | os.PathLike, obj: dict[str, Any]) -> None:
    """Write the JSON object ``obj`` atomically with a ``sha256`` field: its
    :func:`json_checksum`, which :func:`read_checked_json` verifies."""
    write_json(path, {**obj, CHECKSUM_KEY: json_checksum(obj)})


def read_checked_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by :func:`write_checked_json` and verify its checksum.

    Returns:
        The object, its ``sha256`` field included.

    Raises:
        OSError: the file cannot be read (FileNotFoundError: there is none).
        ChecksumError: the file is not a JSON object, has no checksum, or does not match it (the
            message names the file).
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ChecksumError(f"{path}: corrupt ({error})") from None
    if not isinstance(obj, dict):
        raise ChecksumError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    if CHECKSUM_KEY not in obj:
        raise ChecksumError(f"{path}: no {CHECKSUM_KEY} checksum (written by an older tq, or by hand)")
    if obj[CHECKSUM_KEY] != json_checksum(obj):
        raise ChecksumError(f"{path}: the content does not match its {CHECKSUM_KEY} checksum (altered?)")
    return obj


def read_cache_json(
    path: str | os.PathLike, problem: Callable[[dict[str, Any]], str | None], rebuild: str
) -> dict[str, Any] | None:
    """A cache file written by :func:`write_checked_json`, if it exists and verifies: its
    checksum, then ``problem(obj)`` (a sentence saying what is wrong, or None).

    A file that does not verify is never used: a :class:`CacheWarning` names it, the problem and
    ``rebuild`` (what the caller does instead, e.g. "solving the codebook again"), and None is
    returned, as for a missing file, so that the caller rebuilds and rewrites it.
    """
    path = Path(path)
    try:
        obj = read_checked_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ChecksumError) as error:
        message = str(error)
    else:
        found = problem(obj)
        if found is None:
            return obj
        message = f"{path}: {found}"
    warnings.warn(f"{message}; {rebuild}", CacheWarning, stacklevel=3)
    return None


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
