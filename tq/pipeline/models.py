"""The ``models`` of a sweep config, checked when the workflow starts (before any job runs).

An entry names a preset (``{preset: smollm2-135m-instruct}``: exported to an ONNX bundle, or run
by transformers from its converted checkpoint) or a local Hugging Face checkpoint
(``{model_dir: /path, engine: transformers}``), with the engine, device and dtype that run it.
The JSON schema (workflow/schemas/config.schema.yaml) checks types and fills defaults; this module
checks what a schema cannot say clearly, each error naming its key: one of preset / model_dir,
an engine that can run the entry, a checkpoint directory that exists and has its files, distinct
names, and, for a run on this machine, a CUDA GPU for every ``cuda`` model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tq.engines.registry import engine_problem
from tq.models.checkpoint import checkpoint_problem

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class SweepConfigError(ValueError):
    """A ``models`` entry that cannot run; the message starts with its key (``models[1].device``)."""


def _resolve(index: int, entry: dict[str, Any]) -> dict[str, Any]:
    key = f"models[{index}]"
    if ("preset" in entry) == ("model_dir" in entry):
        raise SweepConfigError(f"{key}: give either preset or model_dir (a Hugging Face checkpoint)")
    engine, device, dtype = entry["engine"], entry["device"], entry["dtype"]
    if "model_dir" in entry:
        if engine != "transformers":
            raise SweepConfigError(
                f"{key}.engine: a model_dir (a Hugging Face checkpoint) runs with engine: transformers; "
                "engine onnxruntime runs presets (exported to ONNX bundles)"
            )
        problem = checkpoint_problem(entry["model_dir"])
        if problem is not None:
            raise SweepConfigError(f"{key}.model_dir: {problem}")
    problem = engine_problem(engine, device, dtype)
    if problem is not None:
        field, sentence = problem
        raise SweepConfigError(f"{key}.{field}: {sentence}")
    name = entry.get("name") or entry.get("preset") or Path(entry["model_dir"]).name
    if not NAME.fullmatch(name):
        raise SweepConfigError(
            f"{key}.name: {name!r} cannot name result files (letters, digits, '.', '_' and '-' only)"
        )
    checkpoint = entry.get("model_dir")
    return entry | {"name": name, "checkpoint": checkpoint and str(Path(checkpoint).absolute())}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_models(entries: Sequence[dict[str, Any]], local: bool) -> dict[str, dict[str, Any]]:
    """name -> the entry with ``name`` and ``checkpoint`` (the model_dir made absolute; None for
    a preset) filled in, in config order.

    Args:
        entries: the config's ``models``, after schema validation (engine, device, dtype set).
        local: whether this machine runs the jobs (not a cluster submission): then a ``cuda``
            model needs a GPU here.

    Raises:
        SweepConfigError: naming the entry's key and the problem.
    """
    models: dict[str, dict[str, Any]] = {}
    keys: dict[str, str] = {}
    for index, entry in enumerate(entries):
        model = _resolve(index, entry)
        name = model["name"]
        if name in models:
            raise SweepConfigError(
                f"models[{index}].name: {name!r} also names {keys[name]}; give each model its own name"
            )
        models[name], keys[name] = model, f"models[{index}]"
    cuda = [keys[name] for name, model in models.items() if model["device"] == "cuda"]
    if local and cuda and not _cuda_available():
        raise SweepConfigError(
            f"{cuda[0]}.device: cuda, but this machine has no CUDA GPU (torch.cuda.is_available() is "
            "False): submit the workflow to a cluster with GPU nodes (--profile profiles/slurm) or use "
            "device: cpu"
        )
    return models
