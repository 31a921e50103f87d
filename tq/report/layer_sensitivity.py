"""Section 5 of the report: per-layer sensitivity, one layer quantized at a time."""

from __future__ import annotations

import pandas as pd

from tq.report.flatten import WINDOW_SET
from tq.report.grouping import mean_by
from tq.report.inputs import ReportInputs
from tq.report.labels import decode_first, protocol_label, setting_in_words, with_cache_labels
from tq.report.markdown import format_cell, markdown_table, plus_minus, se_of, what_this_shows, with_errors
from tq.report.plotting import new_figure, plot_lines, plot_title, save_png
from tq.report.rows import perplexity_rows
from tq.report.uncertainty import against_exact, se_units
from tq.report.windows import window_sets

FIGURE = "layer_sensitivity"


def _layer_findings(line: pd.DataFrame) -> str:
    """What the per-layer runs of one model show: the range of the ratios and how many layers,
    and which, differ from exact by their own per-window difference (:func:`against_exact`), or
    that none does."""
    ratio = "perplexity_ratio"
    tested = line[[against_exact(row) is not None for _, row in line.iterrows()]]
    differing = [
        f"layer {int(row['quantized_layer'])} ({plus_minus(row[ratio], se_of(row, ratio))}, "
        f"KL {plus_minus(row['kl_divergence'], se_of(row, 'kl_divergence'))})"
        for _, row in tested.iterrows()
        if against_exact(row)
    ]
    if differing:
        verdict = (
            f"{len(differing)} of {len(tested)} layers differ from exact beyond the 95% interval of "
            f"their per-window quantized - exact NLL difference on {se_units(tested)}: "
            + ", ".join(differing)
        )
    else:
        why = f"not distinguishable on {se_units(tested)}"
        if tested.empty:
            why = "not tested, no standard error recorded"
        verdict = f"no layer's ratio is shown to differ from 1.0 (exact): {why}"
    ratios = line[ratio]
    return (
        f"- {format_cell(line['model'].iloc[0])} ({setting_in_words(line.iloc[0])}, {len(line)} layers): "
        f"ratios {ratios.min():.3f} to {ratios.max():.3f}; {verdict}."
    )


def write(inputs: ReportInputs) -> list[str]:
    """Section 5: the perplexity ratio with one layer quantized at a time, per layer
    (:data:`FIGURE`), and the layers that differ from exact beyond their 95% interval."""
    rows = perplexity_rows(inputs.table, per_layer=True)
    if rows.empty:
        return ["No per-layer sensitivity records: section omitted.", ""]
    rows = rows.assign(quantized_layer=pd.to_numeric(rows["quantized_layers"].astype(str)))
    groups = ["model", "protocol", "key_strategy", "value_strategy", "key_bits", "value_bits", *WINDOW_SET]
    metrics = ["perplexity_ratio", "kl_divergence", "top1_agreement", "scored_tokens"]
    means = decode_first(mean_by(rows, [*groups, "workload", "quantized_layer"], metrics))
    figure, axes = new_figure(1)
    bars = plot_lines(
        axes[0],
        means.assign(protocol=means["protocol"].map(protocol_label)),
        ["model", "protocol"],
        "perplexity_ratio",
        lambda row: f"{format_cell(row['model'])} ({row['protocol']})",
        x="quantized_layer",
    )
    axes[0].axhline(1.0, color="k", linestyle="--", linewidth=1)
    axes[0].set_title(
        plot_title("perplexity ratio with only this layer quantized", bars, "window"), fontsize=10
    )
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("ratio quantized / exact")
    axes[0].grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    save_png(figure, inputs.out_dir / f"{FIGURE}.png")
    findings = [_layer_findings(line) for _, line in means.groupby(groups, dropna=False, sort=False)]
    means = with_errors(
        with_cache_labels(means.assign(protocol=means["protocol"].map(protocol_label))),
        ["perplexity_ratio", "kl_divergence", "top1_agreement"],
    )
    headers = {
        "model": "model",
        "protocol": "protocol",
        "quantized_layer": "layer",
        "keys": "keys",
        "values": "values",
        "perplexity_ratio": "ppl ratio",
        "kl_divergence": "KL",
        "top1_agreement": "top-1",
        "scored_tokens": "scored tokens",
    }
    return [
        "Perplexity with the cache setting applied to one layer and every other layer exact "
        "(short windows: the per-layer differences are paired on the same text). Layers whose "
        "ratio stands out beyond its 95% interval are candidates for `exact_first_layers` / "
        "`exact_last_layers`. The windows: "
        f"{window_sets(rows, inputs.windows)}; ± is one standard error with the window as the unit, and "
        "a layer differs from exact when the 95% interval of its per-window quantized - exact NLL "
        "difference excludes 0 (section 3).",
        "",
        f"![per-layer sensitivity]({FIGURE}.png)",
        "",
        markdown_table(means, headers),
        "",
        *what_this_shows(findings),
    ]
