"""Which engine runs a model: ONNX Runtime on an exported bundle, or transformers on a checkpoint.

    ModelSource("results/bundles/smollm2-135m-instruct")                      # ONNX Runtime, CPU, fp32
    ModelSource("/models/Llama-3.2-1B", engine="transformers", device="cuda", dtype="bfloat16")

:meth:`ModelSource.open` gives the engine's :class:`~tq.engines.onnx.DecodeRunner`; the benchmarks take a
source (or a bundle path, the ONNX default) and record :meth:`ModelSource.describe`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the workflow imports this module when it starts: no decode loop, no kernels
    from tq.engines.onnx import DecodeRunner

ENGINES = ("onnxruntime", "transformers")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
SETTINGS = {"engine": ENGINES, "device": DEVICES, "dtype": DTYPES}


def setting_problem(**settings: str) -> str | None:
    """A sentence naming the first of ``settings`` (engine=, device=, dtype=) whose value is not
    one of its allowed values, or None when all are."""
    for field, value in settings.items():
        if value not in SETTINGS[field]:
            return f"{field} must be one of {SETTINGS[field]}, got {value!r}"
    return None


def engine_problem(engine: str, device: str, dtype: str) -> tuple[str, str] | None:
    """(field, sentence) saying why this engine cannot run on ``device`` in ``dtype``, or None.
    Unknown values are not checked here (:class:`ModelSource` and the config schema do)."""
    if engine == "onnxruntime" and (device, dtype) != ("cpu", "float32"):
        field = "device" if device != "cpu" else "dtype"
        return field, (
            f"engine onnxruntime runs float32 on the CPU (got device {device}, dtype {dtype}); "
            "use engine: transformers"
        )
    return None


@dataclass(frozen=True)
class ModelSource:
    """A model directory and how it runs.

    Attributes:
        path: an ONNX bundle (engine ``onnxruntime``) or a Hugging Face checkpoint directory
            (engine ``transformers``).
        engine: ``onnxruntime`` (CPU, float32 only) or ``transformers``.
        device: ``cpu`` or ``cuda``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        name: the model's name in records (default: the bundle's preset or the directory's name).

    Raises:
        ValueError: an unknown engine, device or dtype, or ONNX Runtime off the CPU or in another
            type than float32.
    """

    path: str | os.PathLike
    engine: str = "onnxruntime"
    device: str = "cpu"
    dtype: str = "float32"
    name: str | None = None

    def __post_init__(self) -> None:
        problem = setting_problem(engine=self.engine, device=self.device, dtype=self.dtype)
        if problem is not None:
            raise ValueError(problem)
        engine = engine_problem(self.engine, self.device, self.dtype)
        if engine is not None:
            raise ValueError(engine[1])

    @classmethod
    def of(cls, model: str | os.PathLike | ModelSource) -> ModelSource:
        """``model`` itself, or a path taken as an ONNX bundle."""
        return model if isinstance(model, ModelSource) else cls(model)

    def open(self, threads: int | None = None) -> DecodeRunner:
        """The engine's runner for this model (loads the model), with ``threads`` CPU threads;
        ``runner.name`` is the model's name in records."""
        if self.engine == "onnxruntime":
            from tq.engines.onnx import RealModelRunner
            from tq.models.bundle import ModelBundle

            runner: DecodeRunner = RealModelRunner(ModelBundle.load(self.path), threads)
        else:
            from tq.engines.transformers import TransformersRunner
            from tq.models.checkpoint import Checkpoint

            runner = TransformersRunner(Checkpoint.load(self.path), self.device, self.dtype, threads)
        runner.name = self.name or runner.files.name
        return runner

    def engine_settings(self) -> dict[str, str]:
        """engine, device and dtype: what an exact reference must have been computed with."""
        return {"engine": self.engine, "device": self.device, "dtype": self.dtype}

    def describe(self) -> dict[str, Any]:
        """The source's fields for a record: model_dir, engine, device, dtype."""
        return {"model_dir": os.fspath(Path(self.path)), **self.engine_settings()}
