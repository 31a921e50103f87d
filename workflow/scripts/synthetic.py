"""One synthetic measurement: d x b x strategy on random unit vectors."""

import os
import sys

from tq.tasks.records import write_record
from tq.tasks.synthetic import run_synthetic

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    os.environ["TQ_NUM_THREADS"] = str(snakemake.threads)
    wildcards, params = snakemake.wildcards, snakemake.params
    record = run_synthetic(
        dim=int(wildcards.dim),
        bits=int(wildcards.bits),
        strategy=wildcards.strategy,
        n=params.n,
        seed=params.seed,
        rotation=params.rotation,
        repeats=params.repeats,
        device=params.device,
    )
    write_record(snakemake.output[0], record)
