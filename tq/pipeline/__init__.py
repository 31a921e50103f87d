"""What the Snakemake workflow needs of tq: sweep checks, the model entries, each rule's code
hash, and running the workflow from outside it (a copy of it, Snakemake as a subprocess, a
single-node SLURM cluster for the cluster tests and benchmark)."""
