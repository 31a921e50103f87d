"""The decode loop on the prompt suite: exact mode (rule compare_exact, which also writes the exact runs
as a reference) or compare mode (rule compare, which reads them)."""

import os
import sys

from tq.cache.config import CacheConfig
from tq.engines.source import ModelSource
from tq.tasks.compare import run_real_model
from tq.tasks.records import write_record
from tq.tasks.trace_export import read_prompts

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    os.environ["TQ_NUM_THREADS"] = str(snakemake.threads)
    params = snakemake.params
    prompts = read_prompts(snakemake.input.prompts)[: params.limit]
    if snakemake.rule == "compare_exact":
        options = {"mode": "exact", "reference_out": snakemake.output.reference}
    else:
        options = {
            "mode": "compare",
            "config": CacheConfig(**params.cache),
            "reference": snakemake.input.reference,
            **params.exact_layers,
        }
    record = run_real_model(
        ModelSource(snakemake.input.model, name=snakemake.wildcards.model, **params.engine),
        prompts,
        max_new_tokens=params.max_new_tokens,
        top_k=params.top_k,
        prompt_format=params.prompt_format,
        threads=snakemake.threads,
        **options,
    )
    if "cache" in snakemake.wildcards.keys():  # the kv_caches entry's label (tq.pipeline.checks)
        record["setting"] = snakemake.wildcards.cache
    write_record(snakemake.output[0], record)  # the record (compare_exact: output.record)
