"""The report's markdown: cells, tables, values with their standard errors, counts and the closing
paragraph of a section."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd


def is_missing(value: Any) -> bool:
    """Whether a cell holds no value (None, NA or NaN)."""
    return value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and math.isnan(value))


def format_cell(value: Any) -> str:
    """A cell as the tables write it: "-" when missing, a whole number below 1e6 without decimals,
    other numbers to 4 significant digits, text with its "|" escaped."""
    if is_missing(value):
        return "-"
    if isinstance(value, (float, np.floating)):
        if float(value).is_integer() and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(table: pd.DataFrame, headers: dict[str, str]) -> str:
    """A GitHub markdown table of the columns named in ``headers`` (column -> header text);
    numbers to 4 significant digits, missing values as "-"."""
    lines = ["| " + " | ".join(headers.values()) + " |", "|" + "---|" * len(headers)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(format_cell(row[name]) for name in headers) + " |")
    return "\n".join(lines)


def plus_minus(value: Any, se: Any, percent: bool = False) -> str:
    """A value and its standard error as "1.194 ± 0.012", both to the SE's second significant
    digit; the value alone (as :func:`format_cell` writes it) without an SE, "-" without a value.
    ``percent``: both as percentages ("50 ± 25%")."""
    if is_missing(value):
        return "-"
    scale, unit = (100.0, "%") if percent else (1.0, "")
    value = float(value) * scale
    if is_missing(se):
        return f"{format_cell(value)}{unit}"
    se = float(se) * scale
    if se <= 0:
        return f"{format_cell(value)} ± 0{unit}"
    decimals = max(0, 1 - math.floor(math.log10(se)))
    return f"{value:.{decimals}f} ± {se:.{decimals}f}{unit}"


def se_of(row: pd.Series, name: str) -> Any:
    """The standard error of metric ``name`` in a row (its ``<name>_se`` cell), NaN without one."""
    return row.get(f"{name}_se", math.nan)


def with_errors(table: pd.DataFrame, names: Iterable[str]) -> pd.DataFrame:
    """The table with each column of ``names`` that has a ``<name>_se`` column shown as text
    "value ± SE" (:func:`plus_minus`); other columns, and rows without an SE, keep the value alone."""
    shown = {
        name: [plus_minus(value, se) for value, se in zip(table[name], table[f"{name}_se"], strict=True)]
        for name in names
        if name in table and f"{name}_se" in table
    }
    return table.assign(**shown)


def counted(counts: Iterable[Any], unit: str) -> str:
    """Counts of some unit as "16 windows" or "8 to 16 windows" (one count: "1 window")."""
    counts = sorted({int(count) for count in counts if not is_missing(count)})
    if not counts:
        return f"an unrecorded number of {unit}s"
    low, high = counts[0], counts[-1]
    return f"{low} {unit}{'s' if high != 1 else ''}" if low == high else f"{low} to {high} {unit}s"


def what_this_shows(findings: list[str]) -> list[str]:
    """A section's closing paragraph: findings computed from its table, one bullet each."""
    return ["**What this shows.**", "", *findings, ""]
