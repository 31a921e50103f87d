"""The markdown report and its plots from the summary table, the perplexity records' per-window
values and the models' per-layer key statistics (tq.report.write_report)."""

import json
import sys
from pathlib import Path

from tq.report import read_per_window, read_summary, write_report

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    summary = read_summary(snakemake.input.summary)
    key_stats = [json.loads(Path(name).read_text()) for name in snakemake.input.key_stats]
    path = write_report(
        summary,
        snakemake.output[0],
        per_window=read_per_window(snakemake.input.per_window),
        key_stats=key_stats,
    )
    missing = [name for name in snakemake.output if not Path(name).is_file()]
    if missing:
        raise SystemExit(f"the report has no section for {', '.join(missing)}: the sweep lacks its records")
    print(f"wrote {path}", file=log)
