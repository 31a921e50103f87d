"""Exact vs quantized perplexity on the Wikipedia text (tq.tasks.perplexity.run_perplexity):
rule perplexity (a cache setting) and rule layer_sensitivity (one layer quantized), both reading
the exact side from the reference of rule perplexity_exact."""

import os
import sys

from tq.cache.config import CacheConfig
from tq.engines.source import ModelSource
from tq.tasks.perplexity import run_perplexity
from tq.tasks.records import write_record

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    os.environ["TQ_NUM_THREADS"] = str(snakemake.threads)
    params = snakemake.params
    record = run_perplexity(
        ModelSource(snakemake.input.model, name=snakemake.wildcards.model, **params.engine),
        CacheConfig(**params.cache),
        windows=params.windows,
        window=params.window,
        context=params.context,
        sample_seed=params.sample_seed,
        protocol=params.protocol,
        batch=params.batch,
        reference=snakemake.input.reference,
        threads=snakemake.threads,
        **(
            {"quantized_layers": params.quantized_layers}
            if snakemake.rule == "layer_sensitivity"
            else params.exact_layers
        ),
    )
    if "cache" in snakemake.wildcards.keys():  # the kv_caches entry's label (tq.pipeline.checks)
        record["setting"] = snakemake.wildcards.cache
    write_record(snakemake.output[0], record)
