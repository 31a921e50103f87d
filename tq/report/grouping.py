"""Rows of the summary table grouped into report rows: means per setting with their standard
errors, refusing to pool two records of one setting."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from tq.report.flatten import COORDINATES
from tq.report.markdown import format_cell


class ReportError(ValueError):
    """The records cannot be reported as they are (a row would pool two records of one setting)."""


def column_or_nan(table: pd.DataFrame, name: str) -> pd.Series:
    """A column, or NaN where the table has no such column."""
    return table[name] if name in table else pd.Series(math.nan, index=table.index)


def varying(table: pd.DataFrame, names: Iterable[str]) -> list[str]:
    """The columns among ``names`` that take more than one value in ``table``."""
    return [name for name in names if table[name].nunique(dropna=False) > 1]


def _combined_se(errors: pd.Series) -> float:
    """The standard error of a mean of k independent estimates, sqrt(sum se²) / k; NaN when one
    of them has no standard error."""
    if errors.isna().any():
        return math.nan
    return math.sqrt((errors**2).sum()) / len(errors)


def _check_pooling(grouped: Any, keys: list[str], over: Sequence[str]) -> None:
    """Refuse a row that would pool two records of one setting: within a group of ``keys``,
    the records must differ in the coordinates ``over`` (the traces a row averages over, say).

    Raises:
        ReportError: naming the row and the coordinates its records differ in, if any (ones
            the row does not show), or saying that they are the same setting twice.
    """
    for values, group in grouped:
        if len(group) < 2:
            continue
        repeated = group.duplicated(list(over), keep=False) if over else np.ones(len(group), dtype=bool)
        if not repeated.any():
            continue
        shown = ", ".join(f"{key}={format_cell(value)}" for key, value in zip(keys, values, strict=True))
        twins = group[repeated]
        hidden = [name for name in COORDINATES if name in twins and twins[name].nunique(dropna=False) > 1]
        why = (
            f"they differ only in {', '.join(hidden)}, which the row does not show"
            if hidden
            else "they are the same setting measured twice"
        )
        raise ReportError(
            f"a report row would pool {len(twins)} records ({shown}): {why}; each setting must have one "
            "record (remove the duplicate from the sweep)"
        )


def mean_by(
    table: pd.DataFrame, keys: list[str], values: list[str], over: Sequence[str] = ()
) -> pd.DataFrame:
    """Mean of ``values`` per group of ``keys`` (missing keys form their own group), with a count.

    A group may only pool records that differ in the coordinates ``over`` (for example the
    traces of one cache setting); two records of one setting are an error
    (:func:`_check_pooling`), never averaged silently. A value with a ``<name>_se`` column keeps
    one: the standard error of the group's mean (:func:`_combined_se`, records taken as
    independent; a group of one record keeps its own).
    """
    errors = [f"{name}_se" for name in values if f"{name}_se" in table]
    table = table.assign(**{name: math.nan for name in values if name not in table})
    grouped = table.groupby(keys, dropna=False, sort=True)
    _check_pooling(grouped, keys, over)
    result = grouped[values].mean()
    for name in errors:
        result[name] = grouped[name].agg(_combined_se)
    result["records"] = grouped.size()
    return result.reset_index()
