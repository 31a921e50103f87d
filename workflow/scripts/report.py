"""The markdown report and its plots from the summary table and the perplexity records' per-window
values (tq.report.write_report)."""

import sys
from pathlib import Path

from tq.report import read_per_window, read_summary, write_report

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    summary = read_summary(snakemake.input.summary)
    path = write_report(summary, snakemake.output[0], per_window=read_per_window(snakemake.input.per_window))
    missing = [name for name in snakemake.output if not Path(name).is_file()]
    if missing:
        raise SystemExit(f"the report has no section for {', '.join(missing)}: the sweep lacks its records")
    print(f"wrote {path}", file=log)
