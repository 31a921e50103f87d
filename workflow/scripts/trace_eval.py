"""One trace under one cache configuration (tq.tasks.trace_eval.run_trace)."""

import os
import sys

from tq.cache.config import CacheConfig
from tq.tasks.records import write_record
from tq.tasks.trace_eval import run_trace

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    os.environ["TQ_NUM_THREADS"] = str(snakemake.threads)
    record = run_trace(
        snakemake.input[0], CacheConfig(**snakemake.params.cache), top_k=snakemake.params.top_k
    )
    if "cache" in snakemake.wildcards.keys():  # the kv_caches entry's label (tq.pipeline.checks)
        record["setting"] = snakemake.wildcards.cache
    write_record(snakemake.output[0], record)
