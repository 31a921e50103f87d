"""Which engine runs a model: ONNX Runtime on an exported bundle, or transformers on a checkpoint.

    ModelSource("results/bundles/smollm2-135m-instruct")                      # ONNX Runtime, CPU, fp32
    ModelSource("/models/Llama-3.2-1B", engine="transformers", device="cuda", dtype="bfloat16")

:meth:`ModelSource.open` gives the engine's :class:`~tq.engines.base.DecodeRunner` (the engines and
what each accepts: :data:`tq.engines.registry.ENGINES`); the benchmarks take a source (or a
bundle path, the ONNX default) and record :meth:`ModelSource.describe`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tq.engines.registry import ENGINES, engine_problem, setting_problem

if TYPE_CHECKING:  # the workflow imports this module when it starts: no decode loop, no kernels
    from tq.engines.base import DecodeRunner


@dataclass(frozen=True)
class ModelSource:
    """A model directory and how it runs.

    Attributes:
        path: the directory the engine reads (its registry entry's ``reads``): an ONNX bundle
            (engine ``onnxruntime``) or a Hugging Face checkpoint (engine ``transformers``).
        engine: a name of :data:`~tq.engines.registry.ENGINES`: ``onnxruntime`` (CPU, float32
            only) or ``transformers``.
        device: ``cpu`` or ``cuda``, one the engine runs on.
        dtype: ``float32``, ``bfloat16`` or ``float16``, one the engine runs in.
        name: the model's name in records (default: the bundle's preset or the directory's name).

    Raises:
        ValueError: an unknown engine, device or dtype, or one the engine does not run (ONNX
            Runtime off the CPU or in another type than float32).
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
        runner = ENGINES[self.engine].open(self.path, self.device, self.dtype, threads)
        runner.name = self.name or runner.files.name
        return runner

    def engine_settings(self) -> dict[str, str]:
        """engine, device and dtype: what an exact reference must have been computed with."""
        return {"engine": self.engine, "device": self.device, "dtype": self.dtype}

    def describe(self) -> dict[str, Any]:
        """The source's fields for a record: model_dir, engine, device, dtype."""
        return {"model_dir": os.fspath(Path(self.path)), **self.engine_settings()}
