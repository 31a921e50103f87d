"""Kernel backends: ``reference`` (NumPy oracle), ``cpu`` (Numba, the default) and ``cuda``
(numba.cuda, NVIDIA GPUs).

Every backend module provides the same six functions, with the same arguments and results:
``mse_encode``, ``mse_decode``, ``mse_scores``, ``prod_encode``, ``prod_decode`` and
``prod_scores`` (see :mod:`tq.kernels.naive` for their contracts). ``TQ_KERNELS=naive``
selects the oracle instead of the Numba CPU kernels for a whole process.

Quantizers and caches choose a device: ``"cpu"`` runs the CPU backend that ``kernels`` /
``$TQ_KERNELS`` names, ``"cuda"`` the GPU backend (an error where no GPU is usable), and
``"auto"`` the GPU when an NVIDIA GPU is present, else the CPU. Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, used by the tests) counts as usable for ``"cuda"`` but never makes
``"auto"`` pick it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

BACKENDS = ("cpu", "naive")  # the CPU backends; the cuda one is chosen by device
DEVICES = ("cpu", "cuda", "auto")


class DeviceUnavailableError(RuntimeError):
    """device="cuda" was asked for where no GPU (nor Numba's simulator) can run the kernels."""


def is_gpu_array(array: Any) -> bool:
    """Whether ``array`` lives on a GPU: anything with ``__cuda_array_interface__`` (torch, CuPy,
    numba device arrays), or an array of Numba's CUDA simulator."""
    return hasattr(array, "__cuda_array_interface__") or bool(getattr(array, "__cuda_ndarray__", False))


def get_backend(name: str | None = None) -> ModuleType:
    """The CPU kernel module ``name``, or the one ``$TQ_KERNELS`` names (default "cpu")."""
    name = name or os.environ.get("TQ_KERNELS", "cpu")
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} (TQ_KERNELS); expected one of {BACKENDS}")
    return importlib.import_module(f"tq.kernels.{name}")


def gpu_present() -> bool:
    """Whether a real NVIDIA GPU can run the cuda kernels (the simulator does not count)."""
    cuda = importlib.import_module("tq.kernels.cuda")
    return cuda.available() and not cuda.simulated()


def resolve_device(device: str) -> str:
    """ "cpu" or "cuda" for a requested device; raises when "cuda" cannot run here."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return "cuda" if gpu_present() else "cpu"
    if device == "cuda" and not importlib.import_module("tq.kernels.cuda").available():
        raise DeviceUnavailableError(
            "device='cuda' needs an NVIDIA GPU with a working CUDA driver (numba.cuda finds none); "
            "use device='cpu' or 'auto', or NUMBA_ENABLE_CUDASIM=1 for Numba's (slow) simulator"
        )
    return device


def backend_for(device: str, kernels: str | None = None) -> tuple[str, ModuleType]:
    """(resolved device, kernel module) for a quantizer's ``device`` and ``kernels`` arguments.

    ``kernels`` picks among the CPU backends ("cpu", "naive"; default ``$TQ_KERNELS``) and
    only applies to the CPU device.
    """
    resolved = resolve_device(device)
    if resolved == "cpu":
        return resolved, get_backend(kernels)
    if kernels is not None:
        raise ValueError(f"kernels={kernels!r} picks a CPU backend; with device='cuda' leave it unset")
    return resolved, importlib.import_module("tq.kernels.cuda")
