"""The exact run on the perplexity windows (tq.tasks.perplexity.perplexity_reference): rule
perplexity_exact, read by rules perplexity and layer_sensitivity."""

import os
import sys

from tq.engines.source import ModelSource
from tq.tasks.perplexity import perplexity_reference

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    os.environ["TQ_NUM_THREADS"] = str(snakemake.threads)
    wildcards = snakemake.wildcards
    reference = perplexity_reference(
        ModelSource(snakemake.input.model, name=wildcards.model, **snakemake.params.engine),
        windows=int(wildcards.windows),
        window=int(wildcards.window),
        context=int(wildcards.context),
        sample_seed=int(wildcards.seed),
        threads=snakemake.threads,
        corpus_file=snakemake.input.corpus,
    )
    reference.save(snakemake.output[0])
