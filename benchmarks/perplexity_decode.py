"""One decode-protocol perplexity job, today's path vs the path with a shared exact reference and
batched decode, in the same run; and decode throughput per batch size.

    .venv/bin/python benchmarks/perplexity_decode.py --json benchmarks/results/perplexity_decode.json
        [--bundle DIR --windows 4 --window 1024 --context 512 --bits 3 --threads 2]

- ``one_sequence_path``: what a perplexity job did before the exact reference and batching:
  per window, the exact model decoded token by token along the text, then the quantized one
  (:meth:`OnnxRunner.generate` with forced tokens, one sequence per ONNX Runtime call).
- ``batched_path``: the exact reference (one call per window) then the quantized side of
  :func:`tq.tasks.perplexity.run_perplexity`, all windows decoded in one call per step. In the
  pipeline the reference is computed once per model and shared by every cache setting, so the
  record gives both the job with its reference and the job reading a saved one.
- ``batch_sweep``: decode tokens/s of :meth:`OnnxRunner.teacher_force` with a quantized
  cache for each batch size (``--sweep-steps`` steps after a ``--context`` prefill), from which
  ``tq.tasks.perplexity.DEFAULT_BATCH`` is chosen.

Both paths score the same tokens; the record checks that their perplexity ratios agree.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from tq.cache.config import CacheConfig
from tq.core.fileio import write_json
from tq.engines.onnx import OnnxRunner
from tq.models.bundle import ModelBundle
from tq.tasks import metrics
from tq.tasks.perplexity import perplexity_reference, run_perplexity, text_windows
from tq.tasks.records import environment, now_iso

DEFAULT_BUNDLE = (
    Path(os.environ.get("TQ_CACHE_DIR", Path.home() / ".cache/tq")) / "bundles/smollm2-135m-instruct"
)


def one_sequence_path(bundle: ModelBundle, args: argparse.Namespace, config: CacheConfig) -> dict:
    runner = OnnxRunner(bundle, args.threads)
    tokens, _ = text_windows(bundle, args.windows, args.window, sample_seed=0)
    start = time.perf_counter()
    exact_nll, quantized_nll = [], []
    for row in tokens:
        prompt, targets = row[: args.context].tolist(), row[args.context :].tolist()
        exact = runner.generate(prompt, 0, forced_tokens=targets).logits
        quantized = runner.generate(prompt, 0, runner.new_cache(config), forced_tokens=targets).logits
        exact_nll.append(metrics.cross_entropy(exact, targets))
        quantized_nll.append(metrics.cross_entropy(quantized, targets))
        print(f"one-sequence path: window done at {time.perf_counter() - start:.0f}s", file=sys.stderr)
    seconds = time.perf_counter() - start
    scored = tokens[:, args.context :].size
    return {
        "seconds": seconds,
        "scored_tokens_per_s": scored / seconds,
        "perplexity_ratio": float(np.exp(np.mean(quantized_nll) - np.mean(exact_nll))),
    }


def batched_path(args: argparse.Namespace, config: CacheConfig) -> dict:
    start = time.perf_counter()
    reference = perplexity_reference(args.bundle, args.windows, args.window, args.context, args.threads)
    reference_seconds = time.perf_counter() - start
    record = run_perplexity(
        args.bundle,
        config,
        windows=args.windows,
        window=args.window,
        context=args.context,
        threads=args.threads,
        reference=reference,
        batch=args.windows,
    )
    seconds = time.perf_counter() - start
    scored = record["metrics"]["scored_tokens"]
    return {
        "seconds_with_reference": seconds,
        "scored_tokens_per_s_with_reference": scored / seconds,
        "reference_seconds": reference_seconds,
        "seconds_reading_reference": record["timing"]["seconds"],
        "scored_tokens_per_s_reading_reference": record["timing"]["scored_tokens_per_s"],
        "batch": args.windows,
        "perplexity_ratio": record["metrics"]["perplexity_ratio"],
        "perplexity_ratio_se": record["metrics"]["perplexity_ratio_se"],
    }


def batch_sweep(bundle: ModelBundle, args: argparse.Namespace, config: CacheConfig) -> list[dict]:
    runner = OnnxRunner(bundle, args.threads)
    sizes = [int(size) for size in args.sweep.split(",")]
    tokens, _ = text_windows(bundle, max(sizes), args.context + args.sweep_steps + 1, sample_seed=0)
    rows = []
    for size in sizes:
        marks: list[float] = []
        runner.teacher_force(
            tokens[:size, : args.context],
            tokens[:size, args.context : args.context + args.sweep_steps + 1],
            [runner.new_cache(config) for _ in range(size)],
            on_step=lambda step, marks=marks: marks.append(time.perf_counter()),
        )
        decode_seconds = marks[-1] - marks[0]
        rows.append({"batch": size, "decode_tokens_per_s": size * (len(marks) - 1) / decode_seconds})
        print(f"batch {size}: {rows[-1]['decode_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--bundle", default=DEFAULT_BUNDLE)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--bits", type=float, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sweep", default="1,2,4,8,16")
    parser.add_argument("--sweep-steps", type=int, default=64)
    args = parser.parse_args()
    bundle = ModelBundle.load(args.bundle)
    config = CacheConfig(key_bits=args.bits, value_bits=args.bits)
    old = one_sequence_path(bundle, args, config)
    new = batched_path(args, config)
    result = {
        "benchmark": "perplexity_decode",
        "model": bundle.info.get("preset") or bundle.path.name,
        "protocol": "decode",
        "windows": args.windows,
        "window": args.window,
        "context": args.context,
        "scored_tokens": args.windows * (args.window - args.context),
        "cache": config.describe(),
        "one_sequence_path": old,
        "batched_path": new,
        "speedup_with_reference": new["scored_tokens_per_s_with_reference"] / old["scored_tokens_per_s"],
        "speedup_reading_reference": new["scored_tokens_per_s_reading_reference"]
        / old["scored_tokens_per_s"],
        "ratios_agree": abs(new["perplexity_ratio"] - old["perplexity_ratio"]) < 1e-3,
        "batch_sweep": batch_sweep(bundle, args, config),
        "env": environment(args.threads),
        "created": now_iso(),
    }
    write_json(args.json, result)
    print(
        f"speedup {result['speedup_with_reference']:.2f}x with the reference, "
        f"{result['speedup_reading_reference']:.2f}x reading it",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
