"""What a perplexity window shape costs, and how sure its figures are, on SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/perplexity_windows.py --json benchmarks/results/perplexity_windows.json
        [--shapes 4x1024c512,16x512c256 --chosen 16x512c256 --layer-shapes 8x384c256,16x320c256]

The pipeline's perplexity jobs (ONNX bundle, decode protocol, 2 threads), one after the other in
one run. For each perplexity shape (windows x window tokens, context), drawn from seed 0: the
exact reference's seconds and, for TurboQuant MSE keys and values at 2 and 3 bits, the job's
seconds, the perplexity ratio and KL with their window-level SE (the window as the unit) and
per-token SE. For the chosen shape, the same on a second window set that shares no article with
the first (the first seed after 0 whose windows come from other articles), and whether the two
sets' ratios agree within their 95% intervals, by each SE. For each layer-sensitivity shape: the
reference's and one job's seconds (layer 1 alone quantized at 2 bits). The config's defaults
and the closing notes of issue 25 come from this file.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from tq.cache.config import CacheConfig
from tq.core.fileio import write_json
from tq.data.corpus import article_tokens, sample_windows
from tq.engines.source import ModelSource
from tq.tasks.perplexity import perplexity_reference, run_perplexity
from tq.tasks.records import environment, now_iso

CACHE = Path(os.environ.get("TQ_CACHE_DIR", Path.home() / ".cache/tq"))
Z95 = 1.959963984540054


def shape(text: str) -> dict[str, int]:
    """``16x512c256`` -> windows 16, window 512, context 256."""
    windows, rest = text.split("x")
    window, context = rest.split("c")
    return {"windows": int(windows), "window": int(window), "context": int(context)}


def disjoint_seed(source: ModelSource, windows: int, window: int) -> int:
    """The first seed after 0 whose windows share no article with seed 0's."""
    tokens, titles = article_tokens(source.open(1).files.encode)
    first = {w.article for w in sample_windows(tokens, titles, windows, window, 0)}
    for seed in range(1, 10_000):
        if first.isdisjoint(w.article for w in sample_windows(tokens, titles, windows, window, seed)):
            return seed
    raise RuntimeError("no seed below 10000 gives a disjoint window set")


def figures(record: dict) -> dict:
    metrics = record["metrics"]
    names = ("perplexity_ratio", "kl_divergence", "top1_agreement")
    out = {name: metrics[name] for name in names}
    for name in names:
        out[f"{name}_se"] = metrics[f"{name}_se"]
        out[f"{name}_se_token"] = metrics[f"{name}_se_token"]
    return out


def timed(source: ModelSource, settings: dict, seed: int, jobs: dict[str, dict], threads: int) -> dict:
    """The reference and each job of ``jobs`` (name -> run_perplexity arguments) on one window set."""
    start = time.perf_counter()
    reference = perplexity_reference(source, threads=threads, sample_seed=seed, **settings)
    result = {
        "sample_seed": seed,
        **settings,
        "reference_seconds": time.perf_counter() - start,
        "articles": sorted({w["title"] for w in reference.config["text_windows"]}),
    }
    for name, arguments in jobs.items():
        start = time.perf_counter()
        record = run_perplexity(
            source, threads=threads, reference=reference, sample_seed=seed, **settings, **arguments
        )
        result[name] = {"job_seconds": time.perf_counter() - start, **figures(record)}
        print(f"{settings} seed {seed} {name}: {result[name]}", file=sys.stderr)
    return result


def agree(first: dict, second: dict, suffix: str) -> bool:
    """Whether two ratios agree within the 95% interval of their difference."""
    se = math.hypot(first[f"perplexity_ratio{suffix}"], second[f"perplexity_ratio{suffix}"])
    return abs(first["perplexity_ratio"] - second["perplexity_ratio"]) <= Z95 * se


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--bundle", default=CACHE / "bundles/smollm2-135m-instruct")
    parser.add_argument("--shapes", default="4x1024c512,16x512c256")
    parser.add_argument("--chosen", default="16x512c256")
    parser.add_argument("--layer-shapes", default="8x384c256,16x320c256")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    source = ModelSource(args.bundle)
    caches = {f"mse{bits}": {"config": CacheConfig(key_bits=bits, value_bits=bits)} for bits in (2, 3)}
    perplexity = {
        text: timed(source, shape(text), 0, caches, args.threads) for text in args.shapes.split(",")
    }
    chosen = shape(args.chosen)
    seed = disjoint_seed(source, chosen["windows"], chosen["window"])
    second = timed(source, chosen, seed, caches, args.threads)
    first = perplexity[args.chosen]
    layer = {"layer1-mse2": {"config": CacheConfig(key_bits=2, value_bits=2), "quantized_layers": [1]}}
    layers = {
        text: timed(source, shape(text), 0, layer, args.threads) for text in args.layer_shapes.split(",")
    }
    write_json(
        args.json,
        {
            "benchmark": "perplexity_windows",
            "model": str(args.bundle),
            "protocol": "decode",
            "threads": args.threads,
            "perplexity": perplexity,
            "second_window_set": second,
            "agreement": {
                name: {
                    "window_se": agree(first[name], second[name], "_se"),
                    "token_se": agree(first[name], second[name], "_se_token"),
                }
                for name in caches
            },
            "layer_sensitivity": layers,
            "env": environment(args.threads),
            "created": now_iso(),
        },
    )


if __name__ == "__main__":
    main()
