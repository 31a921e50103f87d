"""What every section of the report is written from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tq.report.windows import WindowValues


@dataclass(frozen=True)
class ReportInputs:
    """The tables a section reads and where it saves its figures.

    Attributes:
        table: the summary table (summary.csv, one row per record), typed, with only the standard
            errors the report shows (tq.report.uncertainty.window_errors_only).
        windows: the perplexity records' per-window values (per_window.csv).
        key_stats: per-layer key statistics records (tq.tasks.key_stats), one per model.
        out_dir: the folder of report.md; a section saves its figures there as ``<name>.png``.
    """

    table: pd.DataFrame
    windows: WindowValues
    key_stats: Sequence[dict[str, Any]]
    out_dir: Path
