"""Files written atomically (temporary file + rename) get the mode the process umask gives a plain
``open()`` (0o666 & ~umask), not ``mkstemp``'s 0o600; prepared bundles and checkpoints, assembled
in a ``mkdtemp`` directory by tools that write some files private, get it too (tq.core.fileio)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tq.core import fileio
from tq.core.codebook import lloyd_max_codebook
from tq.core.fileio import (
    apply_umask,
    atomic_write_bytes,
    process_umask,
    save_tensors,
    umask_mode,
    write_checked_json,
    write_json,
)
from tq.data.trace import KvTrace


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Set the process umask for one test; the previous one is restored after it."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _trace() -> KvTrace:
    rng = np.random.default_rng(0)
    return KvTrace(
        keys=rng.standard_normal((1, 4, 8)).astype(np.float32),
        values=rng.standard_normal((1, 4, 8)).astype(np.float32),
        queries=rng.standard_normal((1, 1, 8)).astype(np.float32),
        query_positions=np.array([[3]], np.int64),
        model="tiny",
        layer=0,
        head=0,
        rope="post",
    )


WRITERS: dict[str, Callable[[Path], Path]] = {
    "atomic_write_bytes": lambda d: (atomic_write_bytes(d / "a.bin", b"x"), d / "a.bin")[1],
    "write_json (results)": lambda d: (write_json(d / "r.json", {"a": 1}), d / "r.json")[1],
    "write_checked_json": lambda d: (write_checked_json(d / "c.json", {"a": 1}), d / "c.json")[1],
    "save_tensors": lambda d: (save_tensors(d / "t.st", {"x": np.zeros(2)}, {}), d / "t.st")[1],
    "KvTrace.save": lambda d: (_trace().save(d / "trace.st"), d / "trace.st")[1],
}


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, writer, mask, expected):
    umask(mask)
    path = WRITERS[writer](tmp_path)
    assert _mode(path) == expected
    assert [entry.name for entry in tmp_path.iterdir()] == [path.name]  # no temporary file left


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600)])
def test_the_codebook_cache_follows_the_umask(tmp_path, monkeypatch, umask, mask, expected):
    monkeypatch.setenv("TQ_CACHE_DIR", str(tmp_path))
    lloyd_max_codebook.cache_clear()
    umask(mask)
    lloyd_max_codebook(19, 2)
    lloyd_max_codebook.cache_clear()
    assert _mode(tmp_path / "codebooks" / "lloyd-max-d19-b2.json") == expected


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o027, 0o002])
def test_the_umask_is_read_without_changing_it(umask, monkeypatch, mask):
    umask(mask)
    assert process_umask() == mask
    assert umask_mode() == 0o666 & ~mask and umask_mode(directory=True) == 0o777 & ~mask
    monkeypatch.setattr(fileio, "_PROC_STATUS", "/nonexistent/status")  # the os.umask fallback
    assert process_umask() == mask
    assert os.umask(mask) == mask  # still in force


def test_apply_umask_sets_a_tree_like_open_and_mkdir(tmp_path, umask):
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    for file in (root / "a", root / "sub" / "b"):
        file.write_bytes(b"x")
        file.chmod(0o600)
    root.chmod(0o700)
    umask(0o027)
    apply_umask(root)
    assert _mode(root) == _mode(root / "sub") == 0o750
    assert _mode(root / "a") == _mode(root / "sub" / "b") == 0o640


def test_a_prepared_bundle_follows_the_umask(tmp_path, umask):
    """ONNX writes its external data file 0o600 and mkdtemp makes the directory 0o700: a bundle
    prepared under umask 027 is 0o640 / 0o750 throughout, bundle.json included."""
    from tq.models.prepare import prepare_bundle

    umask(0o027)
    out = prepare_bundle("tiny-llama", out=tmp_path / "bundle")
    assert _mode(out) == 0o750
    files = [path for path in out.rglob("*") if path.is_file()]
    assert {"bundle.json", "model.onnx", "model.onnx_data"} <= {path.name for path in files}
    assert {path.name: _mode(path) for path in files} == {path.name: 0o640 for path in files}
