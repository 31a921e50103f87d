"""A quality-vs-bits section, the form of sections 2a (traces) and 2b (compare mode): one figure
of a panel per metric and one line per cache setting, and the table of its means."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from tq.report.grouping import mean_by, varying
from tq.report.labels import LINE_SETTINGS, line_label, with_cache_labels
from tq.report.markdown import markdown_table, with_errors
from tq.report.plotting import finish_axis, new_figure, plot_lines, save_png


def quality_section(
    rows: pd.DataFrame,
    empty: str,
    plot: str,
    metrics: list[tuple[str, str, bool]],
    extra: dict[str, str],
    out_dir: Path,
    note: str,
    over: Sequence[str] = (),
    unit: str | None = None,
) -> list[str]:
    """A quality-vs-bits figure (one panel per metric, one line per key/value strategy pair and
    any other cache setting that varies) and its table, averaged over layers, heads and runs.

    ``metrics``: (column, label, log scale) of each panel, shown in the table too; ``extra``:
    more table columns (column -> header); ``plot``: the figure's file stem (``<plot>.png`` in
    ``out_dir``); ``note``: the paragraph above the figure; ``empty``: the line shown instead
    when there are no ``rows``; ``over``: the coordinates a row averages over (:func:`mean_by`);
    ``unit``: what the records' standard errors take as the unit, named with the error bars.
    """
    if rows.empty:
        return [empty, ""]
    settings = varying(rows, ["model", *LINE_SETTINGS])
    keys = [
        "model",
        "setting",
        "key_strategy",
        "value_strategy",
        "key_bits",
        "value_bits",
        "bits",
        "group_size",
        *LINE_SETTINGS,
    ]
    means = mean_by(rows, keys, [*(name for name, _, _ in metrics), *extra], over)
    quantized = means[~((means["key_strategy"] == "exact") & (means["value_strategy"] == "exact"))]
    figure, axes = new_figure(len(metrics))
    for axis, (name, label, log) in zip(axes, metrics, strict=True):
        data = quantized[quantized[name] > 0] if log else quantized
        bars = plot_lines(
            axis,
            data,
            ["key_strategy", "value_strategy", *settings],
            name,
            lambda row: line_label(row, settings),
        )
        finish_axis(axis, label, label, quantized["bits"], log=log, bars=bars, unit=unit)
    save_png(figure, out_dir / f"{plot}.png")
    means = with_errors(with_cache_labels(means), [name for name, _, _ in metrics])
    headers = {
        "model": "model",
        "keys": "keys",
        "values": "values",
        "residual_length": "residual",
        "exact_layers": "exact layers",
    }
    headers |= {name: label for name, label, _ in metrics} | extra | {"records": "records"}
    return [note, "", f"![{plot}.png]({plot}.png)", "", markdown_table(means, headers), ""]
