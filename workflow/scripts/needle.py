"""Needle-in-a-haystack retrieval, exact vs quantized cache (tq.bench.needle.run_needle)."""

import os
import sys
from pathlib import Path

from tq.bench.needle import run_needle
from tq.kvcache import CacheConfig
from tq.records import write_record

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    os.environ["TQ_NUM_THREADS"] = str(snakemake.threads)
    params = snakemake.params
    record = run_needle(
        snakemake.input.bundle,
        CacheConfig(**params.cache),
        context_lengths=params.context_lengths,
        depths=params.depths,
        trials=params.trials,
        max_new_tokens=params.max_new_tokens,
        threads=snakemake.threads,
        seed=params.seed,
        text=Path(snakemake.input.corpus).read_text(),
    )
    write_record(snakemake.output[0], record)
