"""Decode through transformers with a TurboQuantCache: the reconstruct path (SDPA over the kept
float32 reconstruction) vs the packed path (``attn_implementation="tq_packed"``: attention read
from the packed codes, no float copy of quantized tokens), on the same long context.

    .venv/bin/python benchmarks/transformers_decode.py --json benchmarks/results/transformers_decode.json
        [--checkpoint DIR --context 4096 --steps 32 --bits 4 --threads 2]

Per path: the prefill seconds, decode tokens/s over ``--steps`` greedy steps after the prefill
(the first step excluded: kernel compilation), the cache's ``memory_report()`` after the run
(stored bytes, float32 working buffers, fp32 equivalent), and the generated tokens (the paths
round differently in float32, so past a near-tie their greedy tokens can part:
``tokens_agree_prefix`` counts the leading tokens they share), and the bytes two more steps move
between host and device inside the cache (:class:`tq.engines.transfers.HostTransfers`; the
packed path through its torch kernels, the ones a GPU runs). The checkpoint defaults to the
one the tests keep (``<cache>/checkpoints/smollm2-135m-instruct``, written if absent).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tq.cache.config import CacheConfig
from tq.core.fileio import write_json
from tq.data.corpus import corpus_text
from tq.engines.prepack import prepack_linears
from tq.engines.transfers import HostTransfers
from tq.engines.transformers_cache import TurboQuantCache
from tq.models.prepare import write_hf_checkpoint
from tq.tasks.records import environment, now_iso

CACHE = Path(os.environ.get("TQ_CACHE_DIR", Path.home() / ".cache/tq"))
DEFAULT_CHECKPOINT = CACHE / "checkpoints/smollm2-135m-instruct"


def run_path(checkpoint: Path, attention: str, ids: torch.Tensor, args, config: CacheConfig) -> dict:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation=attention).eval()
    prepack_linears(model)  # as the transformers engine runs a float32 model on the CPU
    cache = TurboQuantCache(model.config, config)
    tokens = []
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        prefill = time.perf_counter() - start
        step_seconds = []
        for _ in range(args.steps):
            token = logits.argmax(-1, keepdim=True)
            tokens.append(int(token))
            start = time.perf_counter()
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
            step_seconds.append(time.perf_counter() - start)
        # two more steps, counted: what a step moves between host and device inside the cache
        # (the packed path through its torch kernels, the ones a GPU runs)
        for layer in cache.layers:
            layer.packed_kernels = "torch"
        with HostTransfers() as moved:
            for _ in range(2):
                logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
    timed = step_seconds[1:]
    report = cache.memory_report()
    del report["layers"]
    print(f"{attention}: prefill {prefill:.1f} s, {len(timed) / sum(timed):.2f} tokens/s", file=sys.stderr)
    return {
        "attention": attention,
        "prefill_seconds": prefill,
        "decode_tokens_per_s": len(timed) / sum(timed),
        "decode_step_seconds_median": float(np.median(timed)),
        "memory": report,
        "host_device_bytes_per_step": moved.nbytes / 2,
        "host_device_crossings_per_step": len(moved.records) / 2,
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--bits", type=float, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQ_NUM_THREADS", str(args.threads))
    if not args.checkpoint.is_dir():
        write_hf_checkpoint("smollm2-135m-instruct", args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    text = corpus_text()[: args.context * 8]
    ids = torch.as_tensor(tokenizer(text)["input_ids"][: args.context])[None]
    if ids.shape[1] < args.context:
        raise SystemExit(f"the corpus gave {ids.shape[1]} tokens, fewer than --context {args.context}")
    config = CacheConfig(key_bits=args.bits, value_bits=args.bits)
    paths = [run_path(args.checkpoint, attention, ids, args, config) for attention in ("sdpa", "tq_packed")]
    reconstruct, packed = paths
    record = {
        "benchmark": "transformers_decode",
        "checkpoint": os.fspath(args.checkpoint),
        "context": args.context,
        "steps": args.steps,
        "cache": config.describe(),
        "reconstruct": reconstruct,
        "packed": packed,
        "held_bytes_ratio": reconstruct["memory"]["held_bytes"] / packed["memory"]["held_bytes"],
        "packed_speed_ratio": packed["decode_tokens_per_s"] / reconstruct["decode_tokens_per_s"],
        "tokens_agree": reconstruct["tokens"] == packed["tokens"],
        "tokens_agree_prefix": next(
            (
                i
                for i, pair in enumerate(zip(reconstruct["tokens"], packed["tokens"], strict=True))
                if pair[0] != pair[1]
            ),
            args.steps,
        ),
        "env": environment(args.threads),
        "created": now_iso(),
    }
    write_json(args.json, record)
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
