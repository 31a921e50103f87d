"""One decode-protocol perplexity job (the pipeline's rule perplexity) on SmolLM2-135M-Instruct
through each engine: ONNX Runtime on the bundle, transformers (CPU, float32) on the checkpoint it
was exported from, with the same windows and cache setting, one after the other in one run.

    .venv/bin/python benchmarks/engines_perplexity.py --json benchmarks/results/engines_perplexity.json
        [--bundle DIR --checkpoint DIR --windows 4 --window 1024 --context 512 --bits 4 --threads 2]

Per engine: the exact reference's seconds (rule perplexity_reference: one call per window), the
job's seconds reading it (rule perplexity: the quantized side decoded token by token, the
windows batched), scored tokens/s, and the perplexity ratio ± SE. The defaults are config.yaml's
perplexity section; bundle and checkpoint default to the ones the tests keep under the cache.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tq.cache.config import CacheConfig
from tq.core.fileio import write_json
from tq.engines.source import ModelSource
from tq.tasks.perplexity import perplexity_reference, run_perplexity
from tq.tasks.records import environment, now_iso

CACHE = Path(os.environ.get("TQ_CACHE_DIR", Path.home() / ".cache/tq"))


def timed_job(source: ModelSource, config: CacheConfig, args: argparse.Namespace) -> dict:
    shape = {"windows": args.windows, "window": args.window, "context": args.context}
    start = time.perf_counter()
    reference = perplexity_reference(source, threads=args.threads, **shape)
    reference_seconds = time.perf_counter() - start
    start = time.perf_counter()
    record = run_perplexity(source, config, threads=args.threads, reference=reference, **shape)
    job_seconds = time.perf_counter() - start
    metrics = record["metrics"]
    print(f"{source.engine}: reference {reference_seconds:.1f} s, job {job_seconds:.1f} s", file=sys.stderr)
    return {
        **source.describe(),
        "reference_seconds": reference_seconds,
        "job_seconds": job_seconds,
        "decode_seconds": record["timing"]["seconds"],
        "scored_tokens_per_s": record["timing"]["scored_tokens_per_s"],
        "perplexity_ratio": metrics["perplexity_ratio"],
        "perplexity_ratio_se": metrics["perplexity_ratio_se"],
        "batch": record["config"]["batch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--bundle", default=CACHE / "bundles/smollm2-135m-instruct")
    parser.add_argument("--checkpoint", default=CACHE / "checkpoints/smollm2-135m-instruct")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--bits", type=float, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    config = CacheConfig(key_bits=args.bits, value_bits=args.bits)
    onnx = timed_job(ModelSource(args.bundle), config, args)
    hf = timed_job(ModelSource(args.checkpoint, engine="transformers"), config, args)
    write_json(
        args.json,
        {
            "benchmark": "engines_perplexity",
            "protocol": "decode",
            "windows": args.windows,
            "window": args.window,
            "context": args.context,
            "cache": config.describe(),
            "threads": args.threads,
            "onnxruntime": onnx,
            "transformers": hf,
            "job_seconds_ratio": hf["job_seconds"] / onnx["job_seconds"],
            "env": environment(args.threads),
            "created": now_iso(),
        },
    )


if __name__ == "__main__":
    main()
