"""Needle-in-a-haystack retrieval, exact vs quantized caches of each width
(tq.tasks.needle.run_needle_sweep): one record per width, in the order of the rule's outputs."""

import os
import sys
from pathlib import Path

from tq.cache.config import CacheConfig
from tq.engines.source import ModelSource
from tq.tasks.needle import run_needle_sweep
from tq.tasks.records import write_record

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    os.environ["TQ_NUM_THREADS"] = str(snakemake.threads)
    params = snakemake.params
    records = run_needle_sweep(
        ModelSource(snakemake.input.model, name=snakemake.wildcards.model, **params.engine),
        [CacheConfig(**cache) for cache in params.caches],
        context_lengths=params.context_lengths,
        depths=params.depths,
        trials=params.trials,
        max_new_tokens=params.max_new_tokens,
        threads=snakemake.threads,
        seed=params.seed,
        text=Path(snakemake.input.corpus).read_text(),
    )
    for path, record in zip(snakemake.output, records, strict=True):
        write_record(path, record)
