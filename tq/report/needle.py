"""Section 8 of the report: needle-in-a-haystack retrieval with the quantized cache."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from tq.report.grouping import column_or_nan, mean_by
from tq.report.inputs import ReportInputs
from tq.report.markdown import format_cell, markdown_table, plus_minus, se_of, what_this_shows, with_errors
from tq.report.plotting import draw_line, finish_axis, interval_half_width, new_figure, save_png

FIGURE = "needle"


def _binomial_se(rate: pd.Series, trials: pd.Series) -> pd.Series:
    """The standard error of a rate over n trials, sqrt(p (1 - p) / n)."""
    return np.sqrt(rate * (1.0 - rate) / trials)


def _with_needle_errors(rows: pd.DataFrame, rates: list[str], lengths: list[int]) -> pd.DataFrame:
    """Needle records with a binomial ``<rate>_se`` for each rate: a per-length rate over that
    length's trials (``by_length.<n>.trials``), an overall one over all of them."""
    counts = rows.reindex(columns=[f"by_length.{length}.trials" for length in lengths])
    total = counts.sum(axis=1, min_count=1)
    pattern = re.compile(r"^by_length\.(\d+)\.")
    errors = {}
    for rate in rates:
        match = pattern.match(rate)
        trials = column_or_nan(rows, f"by_length.{match.group(1)}.trials") if match else total
        errors[f"{rate}_se"] = _binomial_se(column_or_nan(rows, rate), trials)
    return rows.assign(**errors)


def write(inputs: ReportInputs) -> list[str]:
    """Section 8: needle retrieval with the quantized cache against the exact one, per model, bit
    width and haystack length (:data:`FIGURE`), ± binomial standard errors."""
    rows = inputs.table[inputs.table["workload"] == "needle"]
    if rows.empty:
        return ["No needle records: section omitted.", ""]
    pattern = re.compile(r"^by_length\.(\d+)\.(exact|quantized)_retrieval$")
    by_length = sorted({int(m.group(1)) for c in rows.columns if (m := pattern.match(c))})
    per_length = [
        f"by_length.{length}.{side}_retrieval" for length in by_length for side in ("exact", "quantized")
    ]
    rates = ["exact_retrieval", "quantized_retrieval", "answer_agreement", *per_length]
    rows = _with_needle_errors(rows, rates, by_length)
    means = mean_by(rows, ["model", "key_strategy", "key_bits", "bits"], [*rates, "kv_compression_ratio"])
    figure, axes = new_figure(1)
    bars = False
    for length in by_length:
        column = f"by_length.{length}.quantized_retrieval"
        for model, line in means.groupby("model", sort=True):
            half_width = interval_half_width(line, column)
            bars = bars or half_width is not None
            label = f"{format_cell(model)} {length} tokens"
            color = draw_line(axes[0], line["bits"], line[column], half_width, label)
            exact = line[f"by_length.{length}.exact_retrieval"].mean()
            axes[0].axhline(exact, linestyle="--", linewidth=1, color=color)
    finish_axis(axes[0], "needle retrieval (dashed: exact cache)", "retrieval rate", means["bits"], bars=bars)
    save_png(figure, inputs.out_dir / f"{FIGURE}.png")
    headers = {
        "model": "model",
        "bits": "bits",
        "exact_retrieval": "exact",
        "quantized_retrieval": "quantized",
        "answer_agreement": "same answer",
        "kv_compression_ratio": "KV compression",
    }
    for length in by_length:
        headers[f"by_length.{length}.quantized_retrieval"] = f"quantized @{length}"
    findings = [
        f"- {format_cell(row['model'])}, {format_cell(row['bits'])} bits: retrieved "
        f"{plus_minus(row['quantized_retrieval'], se_of(row, 'quantized_retrieval'), percent=True)} of the "
        f"needles vs {plus_minus(row['exact_retrieval'], se_of(row, 'exact_retrieval'), percent=True)} with "
        f"the exact cache; identical answers in "
        f"{plus_minus(row['answer_agreement'], se_of(row, 'answer_agreement'), percent=True)} of the prompts."
        for _, row in means.iterrows()
    ]
    return [
        "A number hidden at several depths of Wikipedia filler, asked for after it, answered greedily "
        "with the exact cache and with a TurboQuant MSE cache (the whole haystack goes through the "
        "quantized cache). A needle counts as retrieved when its number appears in the answer. "
        "± is the binomial standard error of a rate over its trials, sqrt(p (1 - p) / n).",
        "",
        f"![needle]({FIGURE}.png)",
        "",
        markdown_table(with_errors(means, rates), headers),
        "",
        *what_this_shows(findings),
    ]
