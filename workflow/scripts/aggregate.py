"""Every result record of the sweep as one table: results/summary.csv (tq.report)."""

import sys

from tq.report import load_records, summary_table, write_summary

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    table = summary_table(load_records(snakemake.input))
    write_summary(table, snakemake.output[0])
    print(f"{len(table)} records, {len(table.columns)} columns", file=log)
