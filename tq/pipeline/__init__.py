"""What the Snakemake workflow needs of tq: sweep checks and the model entries."""
