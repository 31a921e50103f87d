"""The report's plot style: figures of side-by-side panels, lines of points with 95% error bars,
titles, axes and legends, and PNGs written byte for byte the same for the same data.

matplotlib is imported where a figure is drawn, so that reading the report's sections (the
workflow does, to list its figures) does not load it."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from tq.core.fileio import atomic_write_bytes
from tq.report.grouping import column_or_nan
from tq.report.uncertainty import Z95

BARS_NOTE = f"bars: 95% intervals, ± {Z95} SE"


def save_png(figure: Any, path: Path) -> None:
    """Write a matplotlib figure as PNG at 110 dpi, atomically, without the matplotlib version in
    its metadata (so that the same plot gives the same bytes)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())


def new_figure(panels: int) -> tuple[Any, list[Any]]:
    """A figure of ``panels`` side-by-side axes, 5.2 x 4.2 inches each, and its axes."""
    from matplotlib.figure import Figure

    width = 5.2 * panels  # inches; fixed margins (a layout engine would double the drawing time)
    figure = Figure(figsize=(width, 4.2))
    axes = figure.subplots(1, panels, squeeze=False)[0]
    figure.subplots_adjust(left=1.3 / width, right=1 - 0.15 / width, bottom=0.13, top=0.9, wspace=0.5)
    return figure, list(axes)


def interval_half_width(table: pd.DataFrame, name: str) -> pd.Series | None:
    """Half-widths of the 95% intervals of a column (Z95 · its ``<name>_se``, 0 where a point has
    none), or None when no point of it has a standard error."""
    errors = column_or_nan(table, f"{name}_se")
    return None if errors.isna().all() else Z95 * errors.fillna(0.0)


def draw_line(
    axis: Any, x: pd.Series, y: pd.Series, half_width: pd.Series | None, label: str, **style: Any
) -> str:
    """One line of points, with error bars of ``half_width`` when given; return its colour."""
    if half_width is None:
        (line,) = axis.plot(x, y, marker="o", label=label, **style)
    else:
        line = axis.errorbar(x, y, yerr=half_width, marker="o", capsize=3, label=label, **style).lines[0]
    return line.get_color()


def plot_lines(
    axis: Any,
    table: pd.DataFrame,
    line_keys: list[str],
    y: str,
    label: Callable[[pd.Series], str],
    x: str = "bits",
    **style: Any,
) -> bool:
    """One line per group of ``line_keys``: ``y`` against ``x``, points without a value left out,
    with 95% error bars where ``y`` has standard errors; return whether any bar was drawn."""
    bars = False
    for _, line in table.groupby(line_keys, dropna=False, sort=True):
        line = line.dropna(subset=[x, y]).sort_values(x)
        if len(line):
            half_width = interval_half_width(line, y)
            draw_line(axis, line[x], line[y], half_width, label(line.iloc[0]), **style)
            bars = bars or half_width is not None
    return bars


def plot_title(title: str, bars: bool, unit: str | None = None) -> str:
    """A plot title, saying what the error bars are when there are any (with the ``unit`` of
    their standard errors, such as "window", when given)."""
    if not bars:
        return title
    return f"{title}\n({BARS_NOTE}{f', {unit} as the unit' if unit else ''})"


def finish_axis(
    axis: Any,
    title: str,
    ylabel: str,
    bits: pd.Series,
    log: bool = False,
    bars: bool = False,
    unit: str | None = None,
) -> None:
    """Titles (with :data:`BARS_NOTE` and the SE's ``unit`` when ``bars``), the measured bit
    widths as x ticks, an optional log y axis, grid and legend."""
    axis.set_title(plot_title(title, bars, unit), fontsize=10)
    axis.set_xlabel("bits per coordinate")
    axis.set_xticks(sorted(bits.dropna().unique()))
    axis.set_ylabel(ylabel)
    if log:
        axis.set_yscale("log")
    axis.grid(True, alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7)


def plain_log_y(axis: Any) -> None:
    """A log y axis labelled in plain numbers (2, 5, 10, not 10^0.3)."""
    from matplotlib.ticker import FuncFormatter

    def minor(value: float, _: Any) -> str:  # 2 and 5 of each decade only
        mantissa = value / 10 ** math.floor(math.log10(value)) if value > 0 else 0
        return f"{value:g}" if round(mantissa) in (2, 5) and abs(mantissa - round(mantissa)) < 1e-6 else ""

    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.yaxis.set_minor_formatter(FuncFormatter(minor))
    axis.tick_params(axis="y", which="minor", labelsize=7)
