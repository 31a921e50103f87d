"""Build directories a killed prepare left (``.<name>.partial-*``, ``.<name>.old-*``) are deleted
when the next prepare of the same output takes its lock; a live prepare's are not, because it
holds that lock for as long as its build directory exists (tq.models.prepare)."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from tests.models_fixtures import tiny_bundle
from tq.models import prepare as prepare_module
from tq.models.bundle import ModelBundle
from tq.models.prepare import prepare_bundle, write_hf_checkpoint

# How long a prepare that waits for the lock is given to (wrongly) go ahead: it reuses a tiny
# bundle in well under a second once it has the lock.
BLOCKED_S = 1.0


@pytest.fixture
def bundle_copy(tmp_path_factory, tmp_path) -> Path:
    """A reusable tiny-llama bundle at ``tmp_path / "bundle"`` (prepare reuses it: no export)."""
    return Path(
        shutil.copytree(tiny_bundle(tmp_path_factory.getbasetemp(), "tiny-llama"), tmp_path / "bundle")
    )


def _leftover(parent: Path, name: str) -> Path:
    """A build directory as a killed run leaves it: a hidden directory with part of a bundle."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=name))
    (path / "model.onnx_data").write_bytes(b"\0" * 4096)
    return path


def test_a_prepare_deletes_what_killed_runs_left(bundle_copy, capsys):
    parent = bundle_copy.parent
    stale = [_leftover(parent, ".bundle.partial-"), _leftover(parent, ".bundle.old-")]
    other = _leftover(parent, ".other.partial-")  # another output's: not this prepare's business
    prepare_bundle("tiny-llama", out=bundle_copy)
    err = capsys.readouterr().err
    assert all(not path.exists() and f"deleting {path}, left by an interrupted run" in err for path in stale)
    assert other.is_dir()
    ModelBundle.load(bundle_copy, full_check=True)


def test_a_live_prepare_keeps_its_build_directory(bundle_copy):
    """While a prepare of the same output holds the lock with its build directory, a second one
    waits, and deletes nothing; once the first is done, the second goes ahead."""
    out = bundle_copy
    done = threading.Event()
    errors: list[BaseException] = []

    def second() -> None:
        try:
            prepare_bundle("tiny-llama", out=out)
        except BaseException as error:  # reported by the main thread
            errors.append(error)
        done.set()

    with prepare_module._locked(out):
        live = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
        thread = threading.Thread(target=second)
        thread.start()
        assert not done.wait(BLOCKED_S)  # blocked on the lock
        assert live.is_dir()
        shutil.rmtree(live)  # the first run finishes its build, then releases the lock
    thread.join(timeout=60)
    assert done.is_set() and not errors


def test_a_checkpoint_write_deletes_what_killed_runs_left(tmp_path):
    stale = _leftover(tmp_path, ".checkpoint.partial-")
    out = write_hf_checkpoint("tiny-llama", tmp_path / "checkpoint")
    assert (out / "config.json").is_file()
    assert not stale.exists()
    assert sorted(entry.name for entry in tmp_path.iterdir()) == [".checkpoint.lock", "checkpoint"]
