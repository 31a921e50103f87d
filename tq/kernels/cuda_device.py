"""What every numba.cuda kernel of tq shares: whether a GPU (or the simulator) runs them, launch
constants, and the conversion of arguments to device arrays and of results back.

Arrays. An argument may be a NumPy array or a GPU array (anything with
``__cuda_array_interface__``: Numba device arrays, torch CUDA tensors, CuPy arrays), which is
used in place. Host floats of any precision are converted to float32; GPU floats must be float32,
codes and signs uint8. A launch function returns NumPy arrays when its primary input was a NumPy
array and Numba device arrays otherwise (:func:`results`).

Index arithmetic. Kernel index constants are unsigned (``U``, np.uint64): Numba adds a
negative-index check to every signed index, and with signed indices the kernels were bound by
integer instructions (measured on an H200).
"""

from __future__ import annotations

import functools
from typing import Any

import numba
import numpy as np
from numba import cuda

from tq.kernels import is_gpu_array

__all__ = [
    "THREADS",
    "U",
    "available",
    "check_shape",
    "multiprocessors",
    "placeholder",
    "pow2_ceil",
    "pow2_floor",
    "results",
    "rows_of",
    "simulated",
    "to_device_bytes",
    "to_device_floats",
]

THREADS = 128  # threads per block, every kernel
U = np.uint64  # kernel index constants are unsigned (see the module docstring)


def available() -> bool:
    """Whether numba.cuda can launch kernels here: a usable GPU, or the simulator."""
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver or toolkit install means no GPU backend
        return False


def simulated() -> bool:
    """Whether the kernels run on Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    return bool(numba.config.ENABLE_CUDASIM)


@functools.cache
def multiprocessors() -> int:
    """The GPU's multiprocessor count (1 on the simulator, which has no device to ask)."""
    return 1 if simulated() else int(cuda.get_current_device().MULTIPROCESSOR_COUNT)


def pow2_floor(value: int) -> int:
    """The largest power of two <= value (value >= 1)."""
    return 1 << (value.bit_length() - 1)


def pow2_ceil(value: int) -> int:
    """The smallest power of two >= value (value >= 1)."""
    return 1 << (value - 1).bit_length()


def _as_device(array: Any) -> Any:
    """A GPU array as a Numba device array, without a copy."""
    return array if getattr(array, "__cuda_ndarray__", False) else cuda.as_cuda_array(array)


def to_device_floats(array: Any, name: str) -> Any:
    """A float32 device array of ``array``: GPU arrays as they are (float32 only), host floats
    copied; TypeError names ``name``."""
    if is_gpu_array(array):
        device = _as_device(array)
        if device.dtype != np.float32:
            raise TypeError(f"{name} on the GPU must be float32, got {device.dtype}")
        return device
    host = np.asarray(array)
    if host.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got {host.dtype}")
    return cuda.to_device(np.ascontiguousarray(host, dtype=np.float32))


def to_device_bytes(array: Any, name: str) -> Any:
    """A uint8 device array of ``array`` (GPU arrays as they are); TypeError names ``name``."""
    device = _as_device(array) if is_gpu_array(array) else None
    dtype = device.dtype if device is not None else np.asarray(array).dtype
    if dtype != np.uint8:
        raise TypeError(f"{name} must be uint8, got {dtype}")
    return device if device is not None else cuda.to_device(np.ascontiguousarray(array))


def check_shape(array: Any, shape: tuple[int, ...], name: str) -> None:
    """ValueError unless ``array`` has exactly ``shape``."""
    if tuple(array.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(array.shape)}")


def rows_of(array: Any, dim: int, name: str) -> int:
    """The row count of a [n, dim] array, or ValueError."""
    if len(array.shape) != 2 or array.shape[1] != dim:
        raise ValueError(f"{name} must have shape [n, {dim}], got {list(array.shape)}")
    return int(array.shape[0])


def results(on_device: bool, *arrays: Any) -> Any:
    """The kernel's device arrays, or host copies of them; one array or a tuple."""
    out = arrays if on_device else tuple(array.copy_to_host() for array in arrays)
    return out[0] if len(out) == 1 else out


@functools.cache
def placeholder(dtype: type, ndim: int) -> Any:
    """A one-element device array standing in for an argument a kernel variant does not read."""
    return cuda.to_device(np.zeros((1,) * ndim, dtype))
