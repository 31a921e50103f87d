"""Decode attention from the packed cache on one GPU against torch fp16 attention.

    .venv/bin/python benchmarks/attention_gpu.py --json OUT.json [--context 131072 --heads 32
        --q-heads 32 --dim 128 --bits 4 --residual 0 --repeats 20 --warmup 3]

A random cache (Gaussian keys and values, ``--heads`` KV heads of ``--context`` tokens, TurboQuant
MSE keys and values at ``--bits``, quantized on the GPU when there is one) is uploaded once
(:class:`tq.cache.attention_cuda.DeviceKVCache`); one decode query per query head lives on the
GPU before timing starts. Timed, with CUDA events around each call on the default stream (so
launch overheads count), the median of ``--repeats`` calls after ``--warmup``:

- ``tq decode_attention_cuda``: the three kernels of tq.kernels.attention_cuda, device in, device out;
- ``torch fp16``: q @ K^T, softmax, @ V on fp16 CUDA tensors of the reconstructed cache;
- ``torch sdpa fp16``: torch.nn.functional.scaled_dot_product_attention on the same tensors.

Bytes read per step: the packed cache (codes, norms, exact tokens: ``DeviceKVCache.read_nbytes``)
and 2 * heads * context * dim * 2 for fp16 keys and values; GB/s = those bytes / median time.
Checks: the full output against torch's (fp16 rounding of the reconstruction: TORCH_TOLERANCE),
and, on a smaller cache built the same way (``--check-context`` tokens, fresh random data), against
the Numba CPU :func:`tq.cache.attention.decode_attention` (CPU_TOLERANCE); the script fails after writing
the JSON if they differ.

``--allow-simulator`` runs on Numba's CUDA simulator as a smoke test: sizes are capped, times
are host wall-clock times (meaningless as GPU numbers), torch is skipped and the JSON says
``"simulated": true``.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from numba import cuda

from tq.cache.attention import decode_attention
from tq.cache.attention_cuda import DeviceKVCache, decode_attention_cuda
from tq.cache.config import CacheConfig
from tq.cache.kvcache import QuantizedKVCache
from tq.core.fileio import write_json
from tq.tasks.attention import torch_fp16_attention
from tq.tasks.records import now_iso


def _load_gpu_benchmark():
    """benchmarks/gpu.py beside this script (timing, environment and GPU checks are shared with it)."""
    spec = importlib.util.spec_from_file_location("tq_gpu_benchmark", Path(__file__).with_name("gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_bench = _load_gpu_benchmark()
log = gpu_bench.log

SIMULATOR_MAX = {"context": 64, "heads": 2, "q_heads": 4, "dim": 32}
TORCH_TOLERANCE = 2e-2  # relative max error vs torch fp16 (fp16 keys, values and products)
CPU_TOLERANCE = 1e-4  # relative max error vs the CPU path (both float32, different sum orders)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), 1e-30))


def build_cache(
    context: int, heads: int, dim: int, args: argparse.Namespace, device: str
) -> QuantizedKVCache:
    """A cache of Gaussian keys and values (drawn on all cores, the same for a given seed)."""
    keys = gpu_bench.gaussian_rows(heads * context, dim, args.seed).reshape(heads, context, dim)
    values = gpu_bench.gaussian_rows(heads * context, dim, args.seed + 1).reshape(heads, context, dim)
    config = CacheConfig(
        key_bits=args.bits, value_bits=args.bits, residual_length=args.residual, device=device
    )
    cache = QuantizedKVCache(heads, dim, config)
    cache.append(keys, values)
    return cache


def timing_row(impl: str, times: list[float], bytes_read: int) -> dict[str, Any]:
    median = float(np.median(times))
    return {
        "impl": impl,
        "median_ms": median,
        "min_ms": float(np.min(times)),
        "max_ms": float(np.max(times)),
        "repeats": len(times),
        "bytes_read": bytes_read,
        "gb_per_s": bytes_read / 1e9 / (median / 1e3),
    }


def run_torch(
    torch: Any, cache: QuantizedKVCache, queries: np.ndarray, scale: float, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Time fp16 attention on the reconstruction -> (rows, the matmul path's output as float32)."""
    fp16_bytes = 2 * cache.kv_heads * len(cache) * cache.head_dim * 2
    keys, values = cache.keys(), cache.values()
    matmul_softmax = torch_fp16_attention(torch, queries, keys, values, scale)
    q_heads = queries.shape[0]
    device = torch.device("cuda")
    q = torch.from_numpy(queries).to(device, torch.float16)
    keys, values = (torch.from_numpy(array).to(device, torch.float16) for array in (keys, values))

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(
            q[None], keys[None], values[None], scale=scale, enable_gqa=q_heads != cache.kv_heads
        )

    rows = []
    with torch.inference_mode():
        for impl, call in (("torch fp16", matmul_softmax), ("torch sdpa fp16", sdpa)):
            log(f"  {impl} ...")
            times, out = gpu_bench.time_ms(
                call, args.repeats, args.warmup, False, torch.cuda.synchronize, gpu_bench.torch_events
            )
            rows.append(timing_row(impl, times, fp16_bytes))
            if impl == "torch fp16":
                reference = out.float().cpu().numpy()
    return rows, reference


def print_table(rows: list[dict[str, Any]], simulated: bool) -> None:
    header = f"{'impl':<26} {'median ms':>10} {'MB read':>10} {'GB/s':>9} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        if "skipped" in row:
            print(f"{row['impl']:<26} skipped: {row['skipped']}")
            continue
        speedup = f"{row['speedup']:.3g}" if "speedup" in row else ""
        print(
            f"{row['impl']:<26} {row['median_ms']:>10.4g} {row['bytes_read'] / 1e6:>10.4g} "
            f"{row['gb_per_s']:>9.4g} {speedup:>8}"
        )
    if simulated:
        print("(Numba CUDA simulator: the times are host times of simulated kernels, not GPU numbers)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the result")
    parser.add_argument("--context", type=int, default=131072, help="cached tokens")
    parser.add_argument("--heads", type=int, default=32, help="KV heads")
    parser.add_argument("--q-heads", type=int, default=None, help="query heads (default: --heads)")
    parser.add_argument("--dim", type=int, default=128, help="head_dim")
    parser.add_argument("--bits", type=float, default=4, help="MSE bits for keys and values")
    parser.add_argument("--residual", type=int, default=0, help="most recent tokens kept exact")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-context", type=int, default=4096, help="tokens checked against the CPU")
    parser.add_argument(
        "--allow-simulator", action="store_true", help="smoke test on Numba's CUDA simulator (tiny sizes)"
    )
    args = parser.parse_args()
    args.q_heads = args.q_heads or args.heads
    if min(args.context, args.heads, args.dim, args.repeats, args.check_context) < 1 or args.warmup < 0:
        parser.error("--context, --heads, --dim, --repeats and --check-context must be positive")
    if args.q_heads % args.heads:
        parser.error("--q-heads must be a multiple of --heads")

    from tq.kernels import cuda as gpu

    problem = gpu_bench.gpu_problem(gpu, args.allow_simulator)
    if problem is not None:
        raise SystemExit(f"benchmarks/attention_gpu.py: {problem}")
    simulated = bool(gpu.simulated())
    env = gpu_bench.environment(simulated)
    log(f"GPU: {env['gpu']}")
    sizes = {name: getattr(args, name) for name in SIMULATOR_MAX}
    if simulated and any(sizes[name] > cap for name, cap in SIMULATOR_MAX.items()):
        sizes = {name: min(sizes[name], cap) for name, cap in SIMULATOR_MAX.items()}
        sizes["q_heads"] -= sizes["q_heads"] % sizes["heads"]
        log(f"simulator: sizes capped to {sizes}")
    context, heads, q_heads, dim = sizes["context"], sizes["heads"], sizes["q_heads"], sizes["dim"]
    scale = 1 / float(np.sqrt(dim))
    quantize_on = "cpu" if simulated else "auto"

    log(f"cache: {heads} KV heads x {context} tokens x {dim}, {args.bits} bits ...")
    cache = build_cache(context, heads, dim, args, quantize_on)
    device_cache = DeviceKVCache(cache)
    queries = gpu_bench.gaussian_rows(q_heads, dim, args.seed + 2).reshape(q_heads, 1, dim)
    q_dev = cuda.to_device(queries)

    log("  tq decode_attention_cuda ...")
    times, out = gpu_bench.time_ms(
        lambda: decode_attention_cuda(q_dev, device_cache, scale),
        args.repeats,
        args.warmup,
        simulated,
        cuda.synchronize,
        gpu_bench.numba_events,
    )
    packed_row = timing_row("tq decode_attention_cuda", times, device_cache.read_nbytes)
    out = out.copy_to_host()
    fp16_bytes = 2 * heads * context * dim * 2
    check: dict[str, Any] = {"problems": []}

    torch, why_not = gpu_bench.torch_problem(simulated)
    if torch is None:
        log(f"torch rows skipped: {why_not}")
        torch_rows = [
            {"impl": impl, "bytes_read": fp16_bytes, "skipped": why_not}
            for impl in ("torch fp16", "torch sdpa fp16")
        ]
    else:
        torch_rows, torch_out = run_torch(torch, cache, queries, scale, args)
        check["torch_max_relative"] = relative_error(out, torch_out)
        if check["torch_max_relative"] > TORCH_TOLERANCE:
            check["problems"].append(f"relative error {check['torch_max_relative']:.3g} vs torch fp16")
        baseline = torch_rows[0]["median_ms"]
        packed_row["speedup"] = baseline / packed_row["median_ms"]
        packed_row["speedup_vs_best_torch"] = (
            min(row["median_ms"] for row in torch_rows) / packed_row["median_ms"]
        )

    check_context = min(args.check_context, context)
    log(f"checking a {check_context}-token cache against the CPU decode_attention ...")
    small = build_cache(check_context, heads, dim, args, quantize_on)
    cpu_out = decode_attention(queries, small, scale, device="cpu")
    check["cpu_context"] = check_context
    check["cpu_max_relative"] = relative_error(
        decode_attention_cuda(queries, DeviceKVCache(small), scale), cpu_out
    )
    if check["cpu_max_relative"] > CPU_TOLERANCE:
        check["problems"].append(f"relative error {check['cpu_max_relative']:.3g} vs the CPU")
    check["passed"] = not check["problems"]

    rows = [packed_row, *torch_rows]
    record = {
        "benchmark": "attention_gpu",
        "simulated": simulated,
        "timer": "wall clock (simulator)" if simulated else "CUDA events, default stream",
        "environment": env,
        "created": now_iso(),
        "config": {
            "context": context,
            "heads": heads,
            "q_heads": q_heads,
            "dim": dim,
            "bits": args.bits,
            "residual": args.residual,
            "queries_per_head": 1,
            "scale": scale,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seed": args.seed,
            "requested": {
                "context": args.context,
                "heads": args.heads,
                "q_heads": args.q_heads,
                "dim": args.dim,
            },
        },
        "bytes_read_packed": device_cache.read_nbytes,
        "bytes_read_fp16": fp16_bytes,
        "device_cache_nbytes": device_cache.nbytes,
        "rows": rows,
        "check": check,
        "passed": check["passed"],
    }
    write_json(args.json, record)
    print_table(rows, simulated)
    print(f"wrote {args.json}")
    if not check["passed"]:
        raise SystemExit("benchmarks/attention_gpu.py: " + "; ".join(check["problems"]))


if __name__ == "__main__":
    main()
