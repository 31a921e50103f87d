"""Kernel backends: ``reference`` (NumPy oracle) and ``cpu`` (Numba, the default).

Every backend module provides the same six functions, with the same arguments and results:
``mse_encode``, ``mse_decode``, ``mse_scores``, ``prod_encode``, ``prod_decode`` and
``prod_scores`` (see :mod:`tq.kernels.reference` for their contracts). ``TQ_KERNELS=reference``
selects the oracle for a whole process.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

BACKENDS = ("cpu", "reference")


def get_backend(name: str | None = None) -> ModuleType:
    """The kernel module ``name``, or the one ``$TQ_KERNELS`` names (default "cpu")."""
    name = name or os.environ.get("TQ_KERNELS", "cpu")
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} (TQ_KERNELS); expected one of {BACKENDS}")
    return importlib.import_module(f"tq.kernels.{name}")
