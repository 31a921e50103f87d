"""The synthetic workload: quality and speed of one quantizer on random unit vectors.

Metrics (all for unit vectors x and unit queries q):

- ``d_mse``: mean ||x - x~||^2 (the paper's D_mse, also measured for Prod's reconstruction);
  ``d_mse_expected``: the Lloyd-Max value for this (d, b) (MSE only);
  ``d_mse_upper_bound`` (sqrt(3) pi / 2) 4^-b and ``d_mse_lower_bound`` 4^-b (paper, Thm. 1/3).
- ``ip_mse``: mean (<q, x> - est)^2 over query x vector pairs (the paper's D_prod);
  ``ip_bias``: mean (est - <q, x>); ``ip_slope``: least-squares slope of est on <q, x> (1 when
  unbiased); ``d_prod_upper_bound``: sqrt(3) pi^2 / d 4^-b.
- ``bits_per_vector``, ``bytes_per_vector`` and ``compression_ratio`` against float32.

Timing: median seconds of ``repeats`` runs after one warm-up, and vectors per second, for
quantize, dequantize and inner products (queries x vectors pairs per second for the latter).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tq.cache.strategies import QUANTIZER_STRATEGIES
from tq.kernels.cpu import num_threads
from tq.quant.turboquant import TurboQuantMSE, TurboQuantProd
from tq.tasks.records import make_record

QUICK_VECTORS = 4096
QUERIES = 64
PROGRESS_AFTER_S = 2.0


class Progress:
    """Status lines on stderr, printed only once a run has taken more than a few seconds."""

    def __init__(self, label: str, after_s: float = PROGRESS_AFTER_S) -> None:
        self.label = label
        self.start = time.perf_counter()
        self.after_s = after_s

    def __call__(self, message: str) -> None:
        elapsed = time.perf_counter() - self.start
        if elapsed >= self.after_s:
            print(f"[{self.label} {elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def median_seconds(
    runs: dict[str, Callable[[], object]], repeats: int, progress: Progress
) -> dict[str, float]:
    """Median wall-clock seconds of each named run over ``repeats`` rounds, after one warm-up
    round (compilation and caches). Within a round the runs take turns, so that a slow spell of
    a shared machine lands on all of them rather than on one."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
            progress(f"{name} {index + 1}/{repeats}: {times[name][-1] * 1e3:.1f} ms")
    return {name: float(np.median(values)) for name, values in times.items()}


def run_synthetic(
    dim: int = 128,
    bits: int = 4,
    strategy: str = "mse",
    n: int = 65536,
    seed: int = 0,
    rotation: str = "haar",
    repeats: int = 5,
    quick: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Measure one quantizer on n random unit vectors; return a ``synthetic`` result record.

    ``device`` ("cpu", "cuda", "auto") is where the kernels run; the vectors start and the
    batches end in host memory, so GPU timings include the transfers (benchmarks/gpu.py times
    the kernels alone on device-resident data).
    """
    if strategy not in QUANTIZER_STRATEGIES:
        raise ValueError(f"strategy must be one of {QUANTIZER_STRATEGIES}, got {strategy!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if repeats < 5:
        raise ValueError(f"repeats must be at least 5 (timings are medians), got {repeats}")
    if quick:
        n = min(n, QUICK_VECTORS)
    progress = Progress(f"tq bench synthetic d={dim} b={bits} {strategy}")
    quantizer_type = TurboQuantMSE if strategy == "mse" else TurboQuantProd
    quantizer = quantizer_type(dim, bits, seed=seed, rotation=rotation, device=device)
    rng = np.random.default_rng([seed, dim, bits])
    x = _unit_rows(rng, n, dim)
    queries = _unit_rows(rng, QUERIES, dim)

    batch = quantizer.quantize(x)
    reconstruction = quantizer.dequantize(batch)
    estimates = quantizer.inner_products(queries, batch).astype(np.float64)
    exact = queries.astype(np.float64) @ x.T.astype(np.float64)
    error = estimates - exact
    metrics: dict[str, Any] = {
        "d_mse": float(np.mean(np.sum((x.astype(np.float64) - reconstruction) ** 2, axis=1))),
        "d_mse_expected": quantizer.codebook.distortion if strategy == "mse" else None,
        "d_mse_upper_bound": math.sqrt(3) * math.pi / 2 * 4.0**-bits,
        "d_mse_lower_bound": 4.0**-bits,
        "ip_mse": float(np.mean(error**2)),
        "ip_bias": float(np.mean(error)),
        "ip_slope": float(np.sum(estimates * exact) / np.sum(exact * exact)),
        "d_prod_upper_bound": math.sqrt(3) * math.pi**2 / dim * 4.0**-bits,
        "d_prod_lower_bound": 4.0**-bits / dim,
        "bits_per_vector": batch.bits_per_vector,
        "bytes_per_vector": batch.nbytes / n,
        "compression_ratio": 32.0 * dim / batch.bits_per_vector,
    }
    progress("quality measured; timing")
    seconds = median_seconds(
        {
            "quantize": lambda: quantizer.quantize(x),
            "dequantize": lambda: quantizer.dequantize(batch),
            "inner_products": lambda: quantizer.inner_products(queries, batch),
        },
        repeats,
        progress,
    )
    timing = {
        "repeats": repeats,
        "statistic": "median",
        "seconds": seconds,
        "quantize_vectors_per_s": n / seconds["quantize"],
        "dequantize_vectors_per_s": n / seconds["dequantize"],
        "inner_product_pairs_per_s": n * QUERIES / seconds["inner_products"],
    }
    config = {
        "workload": "synthetic",
        "dim": dim,
        "bits": bits,
        "strategy": strategy,
        "n": n,
        "queries": QUERIES,
        "seed": seed,
        "rotation": rotation,
        "quick": quick,
        "kernels": quantizer.kernels.__name__.rsplit(".", 1)[-1],
        "device": quantizer.device,
    }
    return make_record("synthetic", config, metrics, timing, num_threads())
