"""Where and in what precision torch runs a model: the devices and dtypes of the transformers
engine (and of the trace export, which runs a checkpoint the same way), their torch types, and
the check that a CUDA GPU is there.

torch is imported inside the functions, so the engine registry can name these settings without
importing it.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")


def choice_problem(field: str, value: str, choices: tuple[str, ...]) -> str | None:
    """A sentence naming ``field`` when ``value`` is not one of ``choices``, or None."""
    return None if value in choices else f"{field} must be one of {choices}, got {value!r}"


def torch_setting_problem(device: str, dtype: str) -> str | None:
    """A sentence naming ``device`` or ``dtype`` when torch is not run so here, or None."""
    return choice_problem("device", device, DEVICES) or choice_problem("dtype", dtype, DTYPES)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (one of :data:`DTYPES`)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return getattr(torch, name)


def check_device(device: str) -> None:
    """Raise RuntimeError if ``device`` is ``cuda`` and torch sees no CUDA GPU here."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device cuda was asked for, but torch sees no CUDA GPU on {socket.gethostname()} "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})"
        )
