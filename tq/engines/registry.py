"""The engines tq can decode with, and the settings each accepts.

    ENGINES["onnxruntime"].open("results/bundles/smollm2-135m-instruct", "cpu", "float32", threads=2)

:data:`ENGINES` maps an engine's name (a sweep config's ``engine``) to an :class:`Engine`: the
devices and dtypes it runs, what model directory it reads, and its runner class, named by a
module path and imported only when a runner is opened, so that importing this module (as the
workflow does when it starts) imports neither torch nor ONNX Runtime.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tq.engines import torch_device

if TYPE_CHECKING:
    from tq.engines.base import DecodeRunner


@dataclass(frozen=True)
class Engine:
    """One decode engine.

    Attributes:
        name: its name in configs and records.
        devices: the devices it runs on (``cpu``, ``cuda``).
        dtypes: the weights' and activations' types it runs in.
        reads: the model directory it reads: ``bundle`` (an exported ONNX bundle,
            :class:`~tq.models.bundle.ModelBundle`) or ``checkpoint`` (a Hugging Face checkpoint,
            :class:`~tq.models.checkpoint.Checkpoint`).
        runner: its :class:`~tq.engines.base.DecodeRunner` class, as ``"module:Class"``.
    """

    name: str
    devices: tuple[str, ...]
    dtypes: tuple[str, ...]
    reads: str
    runner: str

    def open(self, path: str | os.PathLike, device: str, dtype: str, threads: int | None) -> DecodeRunner:
        """The runner of the model directory ``path`` (loads the model; imports the engine)."""
        module, _, name = self.runner.partition(":")
        return getattr(importlib.import_module(module), name).open(path, device, dtype, threads)


ENGINES = {
    engine.name: engine
    for engine in (
        Engine("onnxruntime", ("cpu",), ("float32",), "bundle", "tq.engines.onnx:OnnxRunner"),
        Engine(
            "transformers",
            torch_device.DEVICES,
            torch_device.DTYPES,
            "checkpoint",
            "tq.engines.transformers:TransformersRunner",
        ),
    )
}
DEVICES = tuple(dict.fromkeys(device for engine in ENGINES.values() for device in engine.devices))
DTYPES = tuple(dict.fromkeys(dtype for engine in ENGINES.values() for dtype in engine.dtypes))
SETTINGS = {"engine": tuple(ENGINES), "device": DEVICES, "dtype": DTYPES}


def setting_problem(**settings: str) -> str | None:
    """A sentence naming the first of ``settings`` (engine=, device=, dtype=) whose value is not
    one of any engine's, or None when all are."""
    problems = (
        torch_device.choice_problem(field, value, SETTINGS[field]) for field, value in settings.items()
    )
    return next((problem for problem in problems if problem is not None), None)


def engine_problem(engine: str, device: str, dtype: str) -> tuple[str, str] | None:
    """(field, sentence) saying why ``engine`` cannot run on ``device`` in ``dtype``, or None.

    The field is ``engine`` for an unknown engine, else ``device`` or ``dtype``, whichever the
    engine does not run (device first).
    """
    if engine not in ENGINES:
        return "engine", f"engine must be one of {tuple(ENGINES)}, got {engine!r}"
    spec = ENGINES[engine]
    if device in spec.devices and dtype in spec.dtypes:
        return None
    field = "device" if device not in spec.devices else "dtype"
    others = [other.name for other in ENGINES.values() if device in other.devices and dtype in other.dtypes]
    advice = f"; use engine: {others[0]}" if others else ""
    return field, (
        f"engine {engine} runs on {' or '.join(spec.devices)} in {' or '.join(spec.dtypes)} "
        f"(got device {device}, dtype {dtype}){advice}"
    )
