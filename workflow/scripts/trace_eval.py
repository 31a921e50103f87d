"""One trace under one cache configuration (tq.bench.trace.run_trace)."""

import os
import sys

from tq.bench.trace import run_trace
from tq.kvcache import CacheConfig
from tq.records import write_record

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    os.environ["TQ_NUM_THREADS"] = str(snakemake.threads)
    record = run_trace(
        snakemake.input[0], CacheConfig(**snakemake.params.cache), top_k=snakemake.params.top_k
    )
    if "cache" in snakemake.wildcards.keys():  # the kv_caches entry's label (tq.sweep_checks)
        record["setting"] = snakemake.wildcards.cache
    write_record(snakemake.output[0], record)
