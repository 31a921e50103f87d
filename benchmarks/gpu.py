"""TurboQuant's CUDA kernels on one GPU: time, effective bandwidth and the copy-bandwidth floor.

    .venv/bin/python benchmarks/gpu.py --json OUT.json [--n 4194304 --dim 128 --bits 4
        --rotation haar|hadamard --queries 64 --repeats 50 --warmup 5]

All inputs live on the GPU before timing starts. Each operation is timed with CUDA events around
one call of :mod:`tq.kernels.cuda` (so output allocation and launch overhead count), as the
median of ``--repeats`` calls after ``--warmup`` calls. Bandwidth counts the bytes an operation
must read plus the bytes it must write (the quantizer constants, a few KiB, are left out); the
"floor" of an operation is that byte count at the device-to-device copy bandwidth measured in the
same run, and percent_of_floor = 100 * floor_ms / median_ms. A plain torch implementation (dense
rotation matmul, ``torch.bucketize``, shift-and-or packing) is timed the same way when a CUDA
torch is importable. The first ``--check-rows`` rows of every output are checked against the
Numba CPU backend (:mod:`tq.kernels.cpu`); the script fails after writing the JSON if they differ.

``--allow-simulator`` runs on Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) as a smoke test:
sizes are capped, times are host wall-clock times of the simulated kernels (meaningless as GPU
numbers) and the JSON says ``"simulated": true``.

One script of about 730 lines, not a library module: the torch baseline it times, the timing
and environment helpers (which benchmarks/attention_gpu.py loads from it) and the CPU check
belong to this measurement alone.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numba import cuda

from tq.core.fileio import write_json
from tq.core.packing import code_bytes, unpack_codes, unpack_signs
from tq.kernels import cpu as cpu_kernels
from tq.kernels.naive import qjl_scale
from tq.quant.turboquant import TurboQuantMSE, TurboQuantProd
from tq.tasks.records import now_iso

SIMULATOR_MAX_N = 256
SIMULATOR_MAX_QUERIES = 4
MIN_COPY_BYTES = 1 << 30  # on a GPU, copy at least 1 GiB to measure the copy bandwidth
CODE_MISMATCH_LIMIT = 1e-3  # fraction of coordinates whose code may differ from the CPU (ties)
EDGE_DISTANCE_LIMIT = 1e-4  # a differing code must come from a coordinate this close to a cell edge
SIGN_MISMATCH_LIMIT = 1e-3  # fraction of QJL signs that may differ, on rows whose codes agree
RELATIVE_TOLERANCE = 1e-4  # float outputs vs the CPU, relative to the largest magnitude


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def gaussian_rows(n: int, dim: int, seed: int, chunk: int = 1 << 16) -> np.ndarray:
    """float32 [n, dim] standard normal rows, drawn in chunks on all cores (NumPy releases the GIL);
    the same (n, dim, seed) gives the same rows on every machine."""
    out = np.empty((n, dim), np.float32)
    starts = range(0, n, chunk)
    seeds = np.random.SeedSequence(seed).spawn(len(starts))

    def fill(index: int) -> None:
        start = starts[index]
        rng = np.random.default_rng(seeds[index])
        rng.standard_normal(out=out[start : start + chunk], dtype=np.float32)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(fill, range(len(starts))))
    return out


# ---------------------------------------------------------------------------------------------
# Timing


def time_ms(
    call: Callable[[], Any],
    repeats: int,
    warmup: int,
    wall_clock: bool,
    sync: Callable[[], None],
    events: Callable[[], tuple[Any, Any]],
) -> tuple[list[float], Any]:
    """Per-call times in ms and the last call's result.

    Each call sits between two events recorded on the default stream (``events()`` makes a
    (start, end) pair), or with ``wall_clock`` (the simulator, where events record nothing, or
    torch on the CPU) it is wall-clock time up to ``sync()``.
    """
    result = None
    for _ in range(warmup):
        result = call()
    sync()
    times = []
    for _ in range(repeats):
        if wall_clock:
            began = time.perf_counter()
            result = call()
            sync()
            times.append((time.perf_counter() - began) * 1e3)
        else:
            start, end = events()
            start.record()
            result = call()
            end.record()
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
    return times, result


def numba_events():
    return cuda.event(timing=True), cuda.event(timing=True)


def torch_events():
    import torch

    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


# ---------------------------------------------------------------------------------------------
# Bytes each operation must move


def io_bytes(op: str, n: int, dim: int, bits: int, queries: int) -> tuple[int, int]:
    """(bytes read, bytes written) of ``op`` on n vectors, with norms stored (normalize=True)."""
    x = n * dim * 4
    norms = n * 4
    mse_codes = n * code_bytes(dim, bits)
    prod_packed = n * code_bytes(dim, bits - 1) + n * code_bytes(dim, 1) + n * 4 + norms
    q = queries * dim * 4
    scores = queries * n * 4
    return {
        "mse_encode": (x, mse_codes + norms),
        "mse_decode": (mse_codes + norms, x),
        "mse_scores": (q + mse_codes + norms, scores),
        "prod_encode": (x, prod_packed),
        "prod_decode": (prod_packed, x),
        "prod_scores": (q + prod_packed, scores),
    }[op]


def timing_row(
    op: str, impl: str, times: list[float], n: int, read: int, written: int, copy_gb_s: float | None
) -> dict[str, Any]:
    median = float(np.median(times))
    row: dict[str, Any] = {
        "op": op,
        "impl": impl,
        "median_ms": median,
        "min_ms": float(np.min(times)),
        "max_ms": float(np.max(times)),
        "repeats": len(times),
        "vectors": n,
        "vectors_per_s": n / (median / 1e3),
        "bytes_read": read,
        "bytes_written": written,
        "gb_per_s": (read + written) / 1e9 / (median / 1e3),
    }
    if copy_gb_s is not None:
        floor_ms = (read + written) / 1e9 / copy_gb_s * 1e3
        row["floor_ms"] = floor_ms
        row["percent_of_floor"] = 100.0 * floor_ms / median
    return row


# ---------------------------------------------------------------------------------------------
# The plain torch implementation (device-agnostic: the tests run it on the CPU)


def torch_pack(indices, bits: int):
    """uint8 [n, d] codes (< 2^bits) -> uint8 [n, ceil(d*bits/8)], the layout of tq.core.packing."""
    import torch

    n, dim = indices.shape
    if 8 % bits == 0:  # whole codes per byte: code k of a byte goes to bits [k*bits, (k+1)*bits)
        per_byte = 8 // bits
        groups = torch.nn.functional.pad(indices, (0, -dim % per_byte)).view(n, -1, per_byte)
        packed = groups[:, :, 0].clone()
        for k in range(1, per_byte):
            packed |= groups[:, :, k] << (k * bits)
        return packed
    stream = torch.stack([(indices >> k) & 1 for k in range(bits)], dim=2).reshape(n, dim * bits)
    stream = torch.nn.functional.pad(stream, (0, -(dim * bits) % 8)).view(n, -1, 8)
    packed = stream[:, :, 0].clone()
    for k in range(1, 8):
        packed |= stream[:, :, k] << k
    return packed


def torch_unpack(packed, dim: int, bits: int):
    """Inverse of :func:`torch_pack` -> int64 [n, dim] (ready for indexing)."""
    import torch

    n = packed.shape[0]
    if 8 % bits == 0:
        per_byte = 8 // bits
        mask = (1 << bits) - 1
        parts = [(packed >> (k * bits)) & mask for k in range(per_byte)]
        return torch.stack(parts, dim=2).reshape(n, -1)[:, :dim].long()
    stream = torch.stack([(packed >> k) & 1 for k in range(8)], dim=2).reshape(n, -1)[:, : dim * bits]
    stream = stream.reshape(n, dim, bits).long()
    indices = stream[:, :, 0].clone()
    for k in range(1, bits):
        indices |= stream[:, :, k] << k
    return indices


def _torch_units(x, pi):
    import torch

    norms = torch.linalg.vector_norm(x, dim=1)
    units = x / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
    return units @ pi.T, norms


def torch_mse_encode(x, pi, edges, bits: int):
    import torch

    y, norms = _torch_units(x, pi)
    indices = torch.bucketize(y, edges, out_int32=True).to(torch.uint8)  # ties to the lower cell
    return torch_pack(indices, bits), norms


def torch_mse_decode(codes, norms, pi, centroids, bits: int):
    y = centroids[torch_unpack(codes, pi.shape[0], bits)]
    return (y @ pi) * norms[:, None]


def torch_mse_scores(queries, codes, norms, pi, centroids, bits: int):
    y = centroids[torch_unpack(codes, pi.shape[0], bits)]
    return ((queries @ pi.T) @ y.T) * norms[None, :]


def torch_prod_encode(x, pi, s, edges, centroids, bits: int):
    """``bits`` is the MSE stage's bit width (the quantizer's bits - 1)."""
    import torch

    y, norms = _torch_units(x, pi)
    indices = torch.bucketize(y, edges, out_int32=True)
    residual = (y - centroids[indices]) @ pi
    gammas = torch.linalg.vector_norm(residual, dim=1)
    positive = (residual @ s.T >= 0).to(torch.uint8)
    return torch_pack(indices.to(torch.uint8), bits), torch_pack(positive, 1), gammas, norms


def _torch_signs(signs, dim: int):
    return torch_unpack(signs, dim, 1).float() * 2 - 1


def torch_prod_decode(codes, signs, gammas, norms, pi, s, centroids, bits: int):
    dim = pi.shape[0]
    mse = centroids[torch_unpack(codes, dim, bits)] @ pi
    correction = _torch_signs(signs, dim) @ s
    return (mse + qjl_scale(dim) * gammas[:, None] * correction) * norms[:, None]


def torch_prod_scores(queries, codes, signs, gammas, norms, pi, s, centroids, bits: int):
    dim = pi.shape[0]
    y = centroids[torch_unpack(codes, dim, bits)]
    mse = (queries @ pi.T) @ y.T
    qjl = (queries @ s.T) @ _torch_signs(signs, dim).T
    return (mse + qjl_scale(dim) * gammas[None, :] * qjl) * norms[None, :]


def torch_problem(simulated: bool) -> tuple[Any, str | None]:
    """(the torch module, None) when a CUDA torch can run, else (None, why not)."""
    if simulated:
        return None, "Numba's CUDA simulator: no GPU for torch"
    try:
        import torch
    except ImportError as error:
        return None, f"torch is not importable ({error})"
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} has no usable CUDA (torch.cuda.is_available() is False)"
    return torch, None


# ---------------------------------------------------------------------------------------------
# Environment


def _device_name(device) -> str:
    name = device.name
    return name.decode() if isinstance(name, bytes) else str(name)


def _probe(env: dict[str, Any], key: str, read: Callable[[], Any]) -> None:
    """env[key] = read(), or why it could not be read (the benchmark goes on either way)."""
    try:
        env[key] = read()
    except Exception as error:  # numba's driver wrappers and torch raise their own types
        env[key] = f"unknown ({type(error).__name__}: {error})"


def _nvidia_smi() -> str:
    query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.memory"
    result = subprocess.run(
        ["nvidia-smi", query, "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return result.stdout.strip() or result.stderr.strip()


def environment(simulated: bool) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "host": platform.node(),
    }
    _probe(env, "numba_cuda", lambda: importlib.metadata.version("numba-cuda"))
    _probe(env, "torch", lambda: importlib.import_module("torch").__version__)
    _probe(env, "torch_cuda", lambda: importlib.import_module("torch").version.cuda)
    if simulated:
        env["gpu"] = "Numba CUDA simulator"
        return env
    _probe(env, "gpu", lambda: _device_name(cuda.get_current_device()))
    _probe(env, "compute_capability", lambda: list(cuda.get_current_device().compute_capability))
    _probe(env, "gpu_memory_bytes", lambda: int(cuda.current_context().get_memory_info()[1]))
    _probe(env, "cuda_driver_api", lambda: list(cuda.cudadrv.driver.driver.get_version()))
    _probe(env, "cuda_runtime", lambda: list(cuda.runtime.get_version()))
    if shutil.which("nvidia-smi"):
        _probe(env, "nvidia_smi", _nvidia_smi)
    return env


# ---------------------------------------------------------------------------------------------
# Correctness against the Numba CPU backend


def _max_relative(actual: np.ndarray, expected: np.ndarray) -> float:
    scale = max(float(np.max(np.abs(expected))), 1e-30) if expected.size else 1.0
    return float(np.max(np.abs(actual - expected))) / scale if expected.size else 0.0


def compare_codes(
    actual: np.ndarray, expected: np.ndarray, y: np.ndarray, edges: np.ndarray, dim: int, bits: int
) -> dict[str, Any]:
    """Unpacked codes vs the CPU's; y is the rotated unit row in float64, to locate differences."""
    got = unpack_codes(actual, dim, bits).astype(np.int64)
    want = unpack_codes(expected, dim, bits).astype(np.int64)
    differ = got != want
    result = {
        "mismatch_fraction": float(differ.mean()) if differ.size else 0.0,
        "mismatches": int(differ.sum()),
        "max_code_step": int(np.max(np.abs(got - want))) if differ.size else 0,
        "max_edge_distance": 0.0,
    }
    if differ.any():
        lower = np.minimum(got, want)[differ]
        result["max_edge_distance"] = float(
            np.max(np.abs(y[differ] - edges[np.minimum(lower, edges.size - 1)]))
        )
    result["rows_differing"] = differ.any(axis=1)
    return result


def rotated_units(x: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    norms = np.sqrt(np.sum(x64 * x64, axis=1))
    return (x64 / np.where(norms > 0, norms, 1.0)[:, None]) @ matrix.T.astype(np.float64)


def check_against_cpu(
    x: np.ndarray, queries: np.ndarray, outputs: dict[str, Any], mse: TurboQuantMSE, prod: TurboQuantProd
) -> dict[str, Any]:
    """Compare the first rows of every GPU output (host copies in ``outputs``) with tq.kernels.cpu.

    Encodes are compared with the CPU's encodes of the same rows; decodes and scores are
    recomputed on the CPU from the GPU's own codes, so that a tie decided differently does not
    count twice.
    """
    k, dim = x.shape
    check: dict[str, Any] = {"rows": k, "problems": []}
    problems = check["problems"]

    # MSE
    codes, norms = outputs["mse_encode"]
    cpu_codes, cpu_norms = cpu_kernels.mse_encode(x, mse.rotation, mse.codebook, True)
    codes_check = compare_codes(
        codes, cpu_codes, rotated_units(x, mse.rotation.matrix), mse.codebook.edges, dim, mse.bits
    )
    codes_check.pop("rows_differing")
    check["mse_codes"] = codes_check
    check["mse_norms_max_relative"] = _max_relative(norms, cpu_norms)
    decoded = cpu_kernels.mse_decode(codes, norms, mse.rotation, mse.codebook)
    check["mse_decode_max_relative"] = _max_relative(outputs["mse_decode"], decoded)
    scores = cpu_kernels.mse_scores(queries, codes, norms, mse.rotation, mse.codebook)
    check["mse_scores_max_relative"] = _max_relative(outputs["mse_scores"], scores)

    # Prod
    codes, signs, gammas, norms = outputs["prod_encode"]
    cpu_codes, cpu_signs, cpu_gammas, cpu_norms = cpu_kernels.prod_encode(
        x, prod.rotation, prod.qjl, prod.codebook, True
    )
    y = rotated_units(x, prod.rotation.matrix)
    codes_check = compare_codes(codes, cpu_codes, y, prod.codebook.edges, dim, prod.codebook.bits)
    agree = ~codes_check.pop("rows_differing")
    check["prod_codes"] = codes_check
    sign_differ = unpack_signs(signs[agree], dim) != unpack_signs(cpu_signs[agree], dim)
    check["prod_signs_mismatch_fraction"] = float(sign_differ.mean()) if sign_differ.size else 0.0
    check["prod_gammas_max_abs"] = (
        float(np.max(np.abs(gammas[agree] - cpu_gammas[agree]))) if agree.any() else 0.0
    )
    check["prod_norms_max_relative"] = _max_relative(norms, cpu_norms)
    decoded = cpu_kernels.prod_decode(codes, signs, gammas, norms, prod.rotation, prod.qjl, prod.codebook)
    check["prod_decode_max_relative"] = _max_relative(outputs["prod_decode"], decoded)
    scores = cpu_kernels.prod_scores(
        queries, codes, signs, gammas, norms, prod.rotation, prod.qjl, prod.codebook
    )
    check["prod_scores_max_relative"] = _max_relative(outputs["prod_scores"], scores)

    for name in ("mse_codes", "prod_codes"):
        result = check[name]
        if result["mismatch_fraction"] > CODE_MISMATCH_LIMIT:
            problems.append(f"{name}: {result['mismatch_fraction']:.3g} of codes differ from the CPU")
        if result["max_code_step"] > 1 or result["max_edge_distance"] > EDGE_DISTANCE_LIMIT:
            problems.append(
                f"{name}: codes differ by up to {result['max_code_step']} cells, up to "
                f"{result['max_edge_distance']:.3g} from a cell edge (not a tie)"
            )
    if check["prod_signs_mismatch_fraction"] > SIGN_MISMATCH_LIMIT:
        problems.append(f"prod signs: {check['prod_signs_mismatch_fraction']:.3g} differ from the CPU")
    if check["prod_gammas_max_abs"] > RELATIVE_TOLERANCE:  # gamma <= 1 for unit rows
        problems.append(f"prod gammas: differ from the CPU by up to {check['prod_gammas_max_abs']:.3g}")
    for name, value in check.items():
        if name.endswith("max_relative") and value > RELATIVE_TOLERANCE:
            problems.append(f"{name.removesuffix('_max_relative')}: relative error {value:.3g} vs the CPU")
    check["passed"] = not problems
    return check


def torch_code_mismatch(codes: np.ndarray, cpu_codes: np.ndarray, dim: int, bits: int) -> float:
    differ = unpack_codes(codes, dim, bits) != unpack_codes(cpu_codes, dim, bits)
    return float(differ.mean()) if differ.size else 0.0


# ---------------------------------------------------------------------------------------------
# The benchmark


def host(array) -> np.ndarray:
    """A host copy of a numba device array (or a NumPy array)."""
    return array.copy_to_host() if hasattr(array, "copy_to_host") else np.asarray(array)


def measure_copy(source: Any, repeats: int, warmup: int, simulated: bool) -> dict[str, Any]:
    """Device-to-device copies of the device array ``source``: GB/s counting bytes read + written."""
    target = cuda.device_array_like(source)
    times, _ = time_ms(
        lambda: target.copy_to_device(source), repeats, warmup, simulated, cuda.synchronize, numba_events
    )
    median = float(np.median(times))
    moved = 2 * source.nbytes
    return {
        "op": "copy",
        "impl": "numba device_to_device",
        "median_ms": median,
        "min_ms": float(np.min(times)),
        "max_ms": float(np.max(times)),
        "repeats": len(times),
        "bytes_read": source.nbytes,
        "bytes_written": source.nbytes,
        "gb_per_s": moved / 1e9 / (median / 1e3),
    }


def run_kernels(
    gpu: Any,
    x_dev: Any,
    q_dev: Any,
    mse: TurboQuantMSE,
    prod: TurboQuantProd,
    args: argparse.Namespace,
    copy_gb_s: float,
    simulated: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Time the six tq.kernels.cuda functions; returns rows and the last device outputs."""
    n, dim = x_dev.shape
    m = q_dev.shape[0]
    rows, out = [], {}

    def timed(op: str, call: Callable[[], Any]) -> None:
        log(f"  tq.kernels.cuda {op} ...")
        times, out[op] = time_ms(call, args.repeats, args.warmup, simulated, cuda.synchronize, numba_events)
        read, written = io_bytes(op, n, dim, args.bits, m)
        rows.append(timing_row(op, "tq.kernels.cuda", times, n, read, written, copy_gb_s))

    timed("mse_encode", lambda: gpu.mse_encode(x_dev, mse.rotation, mse.codebook, True))
    codes, norms = out["mse_encode"]
    timed("mse_decode", lambda: gpu.mse_decode(codes, norms, mse.rotation, mse.codebook))
    timed("mse_scores", lambda: gpu.mse_scores(q_dev, codes, norms, mse.rotation, mse.codebook))
    timed("prod_encode", lambda: gpu.prod_encode(x_dev, prod.rotation, prod.qjl, prod.codebook, True))
    p_codes, signs, gammas, p_norms = out["prod_encode"]
    timed(
        "prod_decode",
        lambda: gpu.prod_decode(p_codes, signs, gammas, p_norms, prod.rotation, prod.qjl, prod.codebook),
    )
    timed(
        "prod_scores",
        lambda: gpu.prod_scores(
            q_dev, p_codes, signs, gammas, p_norms, prod.rotation, prod.qjl, prod.codebook
        ),
    )
    return rows, out


def run_torch(
    torch, x, queries, mse, prod, args, copy_gb_s, check_rows, device: str = "cuda"
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Time the plain torch implementation (on the GPU; the tests use device="cpu"); returns the
    rows and how often its codes of the first rows differ from the CPU backend's."""
    torch.backends.cuda.matmul.allow_tf32 = False  # full float32 products, like the kernels
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    n, dim = x.shape
    m = queries.shape[0]
    x_t = torch.from_numpy(x).to(dev)
    q_t = torch.from_numpy(queries).to(dev)
    pi = torch.from_numpy(mse.rotation.matrix).to(dev)
    s = torch.from_numpy(prod.qjl).to(dev)
    mse_edges = torch.from_numpy(mse.codebook.edges.astype(np.float32)).to(dev)
    mse_centroids = torch.from_numpy(mse.codebook.centroids.astype(np.float32)).to(dev)
    prod_edges = torch.from_numpy(prod.codebook.edges.astype(np.float32)).to(dev)
    prod_centroids = torch.from_numpy(prod.codebook.centroids.astype(np.float32)).to(dev)
    b, pb = mse.codebook.bits, prod.codebook.bits
    rows, out = [], {}

    def timed(op: str, call: Callable[[], Any]) -> None:
        log(f"  torch {op} ...")
        times, out[op] = time_ms(call, args.repeats, args.warmup, not on_gpu, sync, torch_events)
        read, written = io_bytes(op, n, dim, args.bits, m)
        rows.append(timing_row(op, "torch", times, n, read, written, copy_gb_s))

    with torch.inference_mode():
        timed("mse_encode", lambda: torch_mse_encode(x_t, pi, mse_edges, b))
        codes, norms = out["mse_encode"]
        timed("mse_decode", lambda: torch_mse_decode(codes, norms, pi, mse_centroids, b))
        timed("mse_scores", lambda: torch_mse_scores(q_t, codes, norms, pi, mse_centroids, b))
        timed("prod_encode", lambda: torch_prod_encode(x_t, pi, s, prod_edges, prod_centroids, pb))
        p_codes, signs, gammas, p_norms = out["prod_encode"]
        timed(
            "prod_decode",
            lambda: torch_prod_decode(p_codes, signs, gammas, p_norms, pi, s, prod_centroids, pb),
        )
        timed(
            "prod_scores",
            lambda: torch_prod_scores(q_t, p_codes, signs, gammas, p_norms, pi, s, prod_centroids, pb),
        )
    head = x[:check_rows]
    cpu_mse, _ = cpu_kernels.mse_encode(head, mse.rotation, mse.codebook, True)
    cpu_prod = cpu_kernels.prod_encode(head, prod.rotation, prod.qjl, prod.codebook, True)[0]
    agreement = {
        "mse_code_mismatch_fraction": torch_code_mismatch(
            out["mse_encode"][0][:check_rows].cpu().numpy(), cpu_mse, dim, b
        ),
        "prod_code_mismatch_fraction": torch_code_mismatch(
            out["prod_encode"][0][:check_rows].cpu().numpy(), cpu_prod, dim, pb
        ),
    }
    return rows, agreement


def gpu_problem(gpu, allow_simulator: bool) -> str | None:
    """Why this process cannot benchmark a GPU, or None."""
    if gpu.simulated():
        if allow_simulator:
            return None
        return (
            "numba.cuda is Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), not a GPU: no GPU benchmark "
            "is possible; pass --allow-simulator for a smoke test, or run on a machine with an NVIDIA GPU"
        )
    if not gpu.available():
        return "no usable NVIDIA GPU: numba.cuda.is_available() is False (no device, driver or CUDA toolkit)"
    return None


def print_table(rows: list[dict[str, Any]], simulated: bool) -> None:
    header = (
        f"{'op':<12} {'impl':<24} {'median ms':>10} {'vectors/s':>11} {'GB/s':>9} "
        f"{'floor ms':>9} {'% floor':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        if "skipped" in row:
            print(f"{row['op']:<12} {row['impl']:<24} skipped: {row['skipped']}")
            continue
        vectors = f"{row['vectors_per_s']:.3g}" if "vectors_per_s" in row else ""
        floor = f"{row['floor_ms']:.4g}" if "floor_ms" in row else ""
        percent = f"{row['percent_of_floor']:.3g}" if "percent_of_floor" in row else ""
        print(
            f"{row['op']:<12} {row['impl']:<24} {row['median_ms']:>10.4g} {vectors:>11} "
            f"{row['gb_per_s']:>9.4g} {floor:>9} {percent:>8}"
        )
    if simulated:
        print("(Numba CUDA simulator: the times are host times of simulated kernels, not GPU numbers)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the result")
    parser.add_argument("--n", type=int, default=4 * 1024 * 1024, help="vectors quantized")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--bits", type=int, default=4, help="bits per coordinate (Prod: MSE at bits-1)")
    parser.add_argument("--rotation", choices=("haar", "hadamard"), default="haar")
    parser.add_argument("--queries", type=int, default=64, help="queries scored against all n vectors")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-rows", type=int, default=4096, help="rows checked against the CPU")
    parser.add_argument(
        "--allow-simulator", action="store_true", help="smoke test on Numba's CUDA simulator (tiny sizes)"
    )
    args = parser.parse_args()
    if args.bits < 2:
        parser.error("--bits must be at least 2 (TurboQuantProd spends one bit on the QJL sign)")
    if min(args.n, args.queries, args.repeats, args.check_rows) < 1 or args.warmup < 0:
        parser.error("--n, --queries, --repeats and --check-rows must be positive, --warmup >= 0")

    from tq.kernels import cuda as gpu

    problem = gpu_problem(gpu, args.allow_simulator)
    if problem is not None:
        raise SystemExit(f"benchmarks/gpu.py: {problem}")
    simulated = bool(gpu.simulated())
    env = environment(simulated)
    log(f"GPU: {env['gpu']}")
    n, m = args.n, args.queries
    if simulated and (n > SIMULATOR_MAX_N or m > SIMULATOR_MAX_QUERIES):
        n, m = min(n, SIMULATOR_MAX_N), min(m, SIMULATOR_MAX_QUERIES)
        log(f"simulator: sizes capped to --n {n} --queries {m}")
    check_rows = min(args.check_rows, n)

    mse = TurboQuantMSE(args.dim, args.bits, args.seed, args.rotation, normalize=True, kernels="cpu")
    prod = TurboQuantProd(
        args.dim, args.bits, args.seed, normalize=True, rotation=args.rotation, kernels="cpu"
    )
    log(f"inputs: {n} x {args.dim} float32 ({n * args.dim * 4 / 2**30:.2f} GiB) and {m} queries ...")
    x = gaussian_rows(n, args.dim, args.seed)
    queries = gaussian_rows(m, args.dim, args.seed + 1)
    x_dev = cuda.to_device(x)
    q_dev = cuda.to_device(queries)

    if simulated or x.nbytes >= MIN_COPY_BYTES:
        copy_source = x_dev
    else:
        copy_source = cuda.to_device(np.ones(MIN_COPY_BYTES // 4, np.float32))
    copy_bytes = copy_source.nbytes
    log(f"device-to-device copy of {copy_bytes / 2**30:.3g} GiB ...")
    copy_row = measure_copy(copy_source, args.repeats, args.warmup, simulated)
    del copy_source
    if simulated:
        copy_row["note"] = "simulator: a host memcpy, not a GPU copy bandwidth"
    copy_gb_s = copy_row["gb_per_s"]

    log("tq CUDA kernels ...")
    rows, device_outputs = run_kernels(gpu, x_dev, q_dev, mse, prod, args, copy_gb_s, simulated)

    log(f"checking the first {check_rows} rows against tq.kernels.cpu ...")
    outputs: dict[str, Any] = {}
    for op, result in device_outputs.items():
        if op.endswith("encode"):
            outputs[op] = tuple(host(part[:check_rows]) for part in result)
        elif op.endswith("decode"):
            outputs[op] = host(result[:check_rows])
        else:
            outputs[op] = host(result)[:, :check_rows]
    del device_outputs
    check = check_against_cpu(x[:check_rows], queries, outputs, mse, prod)

    torch, why_not = torch_problem(simulated)
    if torch is None:
        log(f"torch rows skipped: {why_not}")
        torch_rows = [{"op": op, "impl": "torch", "skipped": why_not} for op in (r["op"] for r in rows)]
    else:
        del x_dev  # make room for torch's copies of the inputs
        log("torch baseline ...")
        try:
            torch_rows, check["torch"] = run_torch(torch, x, queries, mse, prod, args, copy_gb_s, check_rows)
        except Exception as error:  # keep the kernel rows: report the baseline's failure in its rows
            traceback.print_exc()
            failed = f"the torch baseline failed: {type(error).__name__}: {error}"
            torch_rows = [{"op": row["op"], "impl": "torch", "skipped": failed} for row in rows]

    all_rows = [copy_row, *rows, *torch_rows]
    record = {
        "benchmark": "gpu",
        "simulated": simulated,
        "timer": "wall clock (simulator)" if simulated else "CUDA events, default stream",
        "environment": env,
        "created": now_iso(),
        "config": {
            "n": n,
            "dim": args.dim,
            "bits": args.bits,
            "rotation": args.rotation,
            "normalize": True,
            "queries": m,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seed": args.seed,
            "check_rows": check_rows,
            "copy_bytes": copy_bytes,
            "requested_n": args.n,
            "requested_queries": args.queries,
        },
        "copy_gb_per_s": copy_gb_s,
        "rows": all_rows,
        "check": check,
        "passed": check["passed"],
    }
    write_json(args.json, record)
    print_table(all_rows, simulated)
    print(f"wrote {args.json}")
    if not check["passed"]:
        raise SystemExit(
            "benchmarks/gpu.py: the GPU results differ from the CPU: " + "; ".join(check["problems"])
        )


if __name__ == "__main__":
    main()
