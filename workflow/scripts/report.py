"""The markdown report and its plots from the summary table (tq.report.write_report)."""

import sys
from pathlib import Path

from tq.report import read_summary, write_report

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    path = write_report(read_summary(snakemake.input[0]), snakemake.output[0])
    missing = [name for name in snakemake.output if not Path(name).is_file()]
    if missing:
        raise SystemExit(f"the report has no section for {', '.join(missing)}: the sweep lacks its records")
    print(f"wrote {path}", file=log)
