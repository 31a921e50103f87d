"""The perplexity records' text windows (per_window.csv) as the report reads them: the windows
of the setting a report row shows, whether two settings were scored on the same windows, and
the window sets in words."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tq.report.flatten import PER_WINDOW_COLUMNS, WINDOW_SET, WINDOW_SETTINGS, typed_windows
from tq.report.grouping import ReportError
from tq.report.markdown import counted, format_cell, is_missing


def _same_value(a: Any, b: Any) -> bool:
    """Whether two cells hold the same value, two missing values counting as the same."""
    return (is_missing(a) and is_missing(b)) or (not is_missing(a) and not is_missing(b) and a == b)


class WindowValues:
    """The per-window values of the perplexity records (:func:`per_window_table`, read back from
    per_window.csv), found by the setting a report row shows."""

    def __init__(self, per_window: pd.DataFrame | None) -> None:
        table = per_window if per_window is not None else pd.DataFrame(columns=list(PER_WINDOW_COLUMNS))
        table = typed_windows(table)
        self._records = [
            (dict(zip(WINDOW_SETTINGS, key, strict=True)), windows.sort_values("window_index"))
            for key, windows in table.groupby(list(WINDOW_SETTINGS), dropna=False, sort=False)
        ]

    def of(self, row: pd.Series) -> pd.DataFrame | None:
        """The windows of the one record whose setting ``row`` shows, in window order; None when
        no record with per-window values has it. A row matches a record on every setting of
        :data:`WINDOW_SETTINGS` it has; a row without ``quantized_layers`` shows a whole-model
        setting (none).

        Raises:
            ReportError: two records match (the row would pool them).
        """
        shown = [name for name in WINDOW_SETTINGS if name in row.index]
        found = [
            windows
            for setting, windows in self._records
            if all(_same_value(setting[name], row[name]) for name in shown)
            and ("quantized_layers" in shown or is_missing(setting["quantized_layers"]))
        ]
        if len(found) > 1:
            raise ReportError(f"{len(found)} perplexity records match one report row: {dict(row)}")
        return found[0] if found else None

    def articles(self, rows: pd.DataFrame) -> list[int]:
        """How many distinct articles the windows of each record of ``rows`` come from (records
        with per-window values only), sorted."""
        found = [self.of(row) for _, row in rows.iterrows()]
        return sorted(windows["article"].nunique() for windows in found if windows is not None)

    def texts(self, rows: pd.DataFrame) -> list[str]:
        """The descriptions of the text the windows of ``rows`` come from (``config.text``)."""
        found = [self.of(row) for _, row in rows.iterrows()]
        texts = {windows["text"].iloc[0] for windows in found if windows is not None}
        return sorted(str(text) for text in texts if not is_missing(text))


def same_windows(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Whether two records were scored on the same windows: the same articles, offsets and scored
    tokens, window by window."""
    columns = ["article", "offset", "tokens"]
    return len(a) == len(b) and bool((a[columns].to_numpy() == b[columns].to_numpy()).all())


def window_sets(rows: pd.DataFrame, windows: WindowValues) -> str:
    """The windows some perplexity rows were scored on, per window set: "16 windows of 1024 tokens
    (512 of context, 512 scored) drawn from seed 0 across 16 distinct articles"."""
    described = []
    for (seed, count, window, context), group in rows.groupby(list(WINDOW_SET), dropna=False, sort=True):
        text = (
            f"{counted([count], 'window')} of {format_cell(window)} tokens ({format_cell(context)} of context"
        )
        text += f", {format_cell(window - context)} scored)" if not is_missing(window - context) else ")"
        articles = windows.articles(group)
        if not is_missing(seed):
            text += f" drawn from seed {format_cell(seed)}"
        if articles and articles[0] == articles[-1]:
            text += f" across {articles[0]} distinct article{'s' if articles[0] != 1 else ''}"
        elif articles:
            text += f" across {articles[0]} to {articles[-1]} distinct articles (per record)"
        described.append(text)
    return "; ".join(described)
