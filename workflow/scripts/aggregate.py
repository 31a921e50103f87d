"""Every result record of the sweep as one table, results/summary.csv, and the perplexity records'
per-window values (results/per_window.csv) and per-token values (results/per_token.parquet)
beside it (tq.report)."""

import sys

from tq.report import (
    load_records,
    per_token_table,
    per_window_table,
    summary_table,
    write_per_token,
    write_per_window,
    write_summary,
)

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    records = load_records(snakemake.input)
    table = summary_table(records)
    write_summary(table, snakemake.output.summary)
    print(f"{len(table)} records, {len(table.columns)} columns", file=log)
    windows = per_window_table(records)
    write_per_window(windows, snakemake.output.per_window)
    tokens = per_token_table(records)
    write_per_token(tokens, snakemake.output.per_token)
    print(f"{len(windows)} perplexity windows, {len(tokens)} scored tokens", file=log)
