"""The cross-model section of the report: where TurboQuant breaks, and which fix holds, from the
whole-model perplexity records of every model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from tq.report.flatten import WINDOW_SETTINGS
from tq.report.grouping import mean_by
from tq.report.inputs import ReportInputs
from tq.report.key_stats import key_stats_lines
from tq.report.labels import setting_label, strategy_family
from tq.report.markdown import format_cell, is_missing, plus_minus, se_of, what_this_shows
from tq.report.plotting import BARS_NOTE, interval_half_width, plain_log_y, save_png
from tq.report.rows import perplexity_rows
from tq.report.uncertainty import against_exact, paired_nll
from tq.report.windows import WindowValues

# The file stem of each model's quality-vs-stored-bits figure ({model}: the model's name).
MODEL_FIGURE = "perplexity-{model}"
# The quality a cross-model row shows, with their standard errors.
_ACROSS_METRICS = ("perplexity_ratio", "kl_divergence", "kv_compression_ratio")
_FAMILY_STYLES = {  # family -> (colour, marker)
    "TurboQuant": ("tab:blue", "o"),
    "TurboQuant + fix": ("tab:green", "D"),
    "vLLM preset": ("tab:purple", "s"),
    "baseline": ("tab:orange", "^"),
}


def figure_name_of_model(model: str) -> str:
    """The file stem of a model's quality-vs-stored-bits figure: ``perplexity-<model>``."""
    return MODEL_FIGURE.format(model=model)


def _family(row: pd.Series) -> str:
    """Which kind of cache a row is, for the colours of the cross-model plots."""
    if str(setting_label(row)).startswith("vllm-"):
        return "vLLM preset"
    families = {strategy_family(row[f"{part}_strategy"]) for part in ("key", "value")}
    if "uniform" in families:
        return "baseline"
    fixed = (
        not families <= {"turboquant", "exact"}
        or (not is_missing(row.get("center_keys")) and bool(row["center_keys"]))
        or (not is_missing(row.get("exact_layers")) and row["exact_layers"] != "none")
        or max(row["key_bits"], row["value_bits"]) >= 8
    )
    return "TurboQuant + fix" if fixed else "TurboQuant"


def _across_rows(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, setting) of the whole-model perplexity records (decode protocol first:
    the leading one), with ``stored_bits``: every stored bit per cached coordinate (codes, norms,
    scales, zero points, means, and the fp32 tokens of exact layers or windows), 32 / the KV
    compression."""
    rows = perplexity_rows(table)
    if rows.empty:
        return rows
    protocol = "decode" if (rows["protocol"] == "decode").any() else rows["protocol"].dropna().iloc[0]
    rows = rows[rows["protocol"] == protocol]
    keys = [name for name in WINDOW_SETTINGS if name in rows.columns]
    means = mean_by(rows, keys, list(_ACROSS_METRICS))
    means = means.assign(
        label=[setting_label(row) for _, row in means.iterrows()],
        family=[_family(row) for _, row in means.iterrows()],
        stored_bits=32.0 / means["kv_compression_ratio"],
    )
    return means


def _frontier(rows: pd.DataFrame) -> pd.DataFrame:
    """The settings no other beats at their budget: each has a lower perplexity ratio than every
    setting that stores as many bits or fewer (the best measured setting at each budget)."""
    ordered = rows.dropna(subset=["stored_bits", "perplexity_ratio"]).sort_values(
        ["stored_bits", "perplexity_ratio"], kind="stable"
    )
    best, keep = math.inf, []
    for index, row in ordered.iterrows():
        if row["perplexity_ratio"] < best:
            best = row["perplexity_ratio"]
            keep.append(index)
    return ordered.loc[keep]


def _plot_model_quality(rows: pd.DataFrame, model: str, path: Path) -> None:
    """Perplexity ratio and KL against stored bits for one model: one point per setting, coloured
    by family, 95% interval bars, the best setting at each budget joined and named."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13.0, 5.0))
    axes = figure.subplots(1, 2)
    figure.subplots_adjust(left=0.07, right=0.8, bottom=0.12, top=0.86, wspace=0.3)
    best = _frontier(rows)
    for axis, metric, ylabel in (
        (axes[0], "perplexity_ratio", "perplexity ratio (quantized / exact)"),
        (axes[1], "kl_divergence", "KL(exact || quantized), nats per token"),
    ):
        for family, (colour, marker) in _FAMILY_STYLES.items():
            group = rows[(rows["family"] == family) & rows[metric].notna() & (rows[metric] > 0)]
            if group.empty:
                continue
            half = interval_half_width(group, metric)
            axis.errorbar(
                group["stored_bits"], group[metric], yerr=half, fmt=marker, color=colour, capsize=3,
                markersize=6, linestyle="none", label=family,
            )  # fmt: skip
        shown = best[best[metric].notna() & (best[metric] > 0)]
        axis.step(
            shown["stored_bits"], shown[metric], where="post", color="0.3", linewidth=1, linestyle=":",
            label="best ratio at each budget",
        )  # fmt: skip
        axis.scatter(shown["stored_bits"], shown[metric], s=150, facecolors="none", edgecolors="k", zorder=3)
        for number, (_, row) in enumerate(shown.iterrows(), start=1):  # numbered, named beside the legend
            axis.annotate(
                str(number), (row["stored_bits"], row[metric]), xytext=(7, 4), textcoords="offset points",
                fontsize=8, fontweight="bold",
            )  # fmt: skip
        if metric == "perplexity_ratio":
            axis.axhline(1.0, color="k", linewidth=0.8, linestyle="--")
        plain_log_y(axis)
        axis.margins(x=0.15)  # room for the numbers of the end points
        axis.set_xlabel("stored bits per coordinate (codes, norms, scales, exact layers)")
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
    axes[0].set_title("perplexity ratio (dashed: exact cache)", fontsize=10)
    axes[1].set_title("KL divergence (circled: the best ratios, left)", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower left", bbox_to_anchor=(0.81, 0.55), fontsize=8, frameon=False)
    names = [f"{number}  {label}" for number, label in enumerate(best["label"], start=1)]
    figure.text(0.815, 0.5, "best ratio at each budget:\n" + "\n".join(names), fontsize=8, va="top")
    figure.suptitle(f"{model}: quality against stored bits ({BARS_NOTE}, window as the unit)", fontsize=11)
    save_png(figure, path)


def _across_table(rows: pd.DataFrame, models: Sequence[str]) -> str:
    """One row per setting, a column group per model: ratio ± SE, KL ± SE, stored bits."""
    order = (
        rows.assign(first=rows["model"] == models[0])
        .sort_values(["first", "stored_bits"], ascending=[False, True], kind="stable")["label"]
        .drop_duplicates()
    )
    headers = ["setting"]
    for model in models:
        headers += [f"{model} ratio", f"{model} KL", f"{model} bits"]
    lines = ["| " + " | ".join(format_cell(header) for header in headers) + " |", "|" + "---|" * len(headers)]
    for label in order:
        cells = [format_cell(label)]
        for model in models:
            found = rows[(rows["model"] == model) & (rows["label"] == label)]
            if found.empty:
                cells += ["-", "-", "-"]
                continue
            row = found.iloc[0]
            cells += [
                plus_minus(row["perplexity_ratio"], se_of(row, "perplexity_ratio")),
                plus_minus(row["kl_divergence"], se_of(row, "kl_divergence")),
                "-" if is_missing(row["stored_bits"]) else f"{row['stored_bits']:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _across_findings(rows: pd.DataFrame, models: Sequence[str], windows: WindowValues) -> list[str]:
    """What holds on every model and what does not, by each setting's own interval against exact
    (:func:`against_exact`); what centring the keys changes, by paired per-window differences;
    and the best measured setting at each budget."""
    findings = []
    verdicts: dict[str, dict[str, bool | None]] = {}
    for _, row in rows.iterrows():
        verdicts.setdefault(row["label"], {})[row["model"]] = against_exact(row)
    on_all = {label: v for label, v in verdicts.items() if set(models) <= set(v) and None not in v.values()}
    if len(models) > 1 and on_all:
        groups = {
            "not distinguishable from the exact cache on every model": [
                label for label, v in on_all.items() if not any(v.values())
            ],
            "worse than the exact cache on every model": [
                label for label, v in on_all.items() if all(v.values())
            ],
        }
        for model in models:
            groups[f"not distinguishable from exact on {model} only"] = [
                label for label, v in on_all.items() if not v[model] and sum(not x for x in v.values()) == 1
            ]
        for what, labels in groups.items():
            if labels:
                findings.append(f"- {what[0].upper()}{what[1:]}: {', '.join(labels)}.")
    for model in models:
        mine = rows[rows["model"] == model]
        for _, row in mine.iterrows():
            label = row["label"]
            if not label.endswith("-kc"):
                continue
            base = mine[mine["label"] == label[: -len("-kc")]]
            if base.empty:
                continue
            base = base.iloc[0]
            paired = paired_nll(windows.of(row), windows.of(base))
            ratio = "perplexity_ratio"
            centred = plus_minus(row[ratio], se_of(row, ratio))
            change = f"{plus_minus(base[ratio], se_of(base, ratio))} -> {centred}"
            if paired is None:
                verdict = "not tested (no per-window values)"
            else:
                size = f"({paired.mean:+.3f} ± {paired.se:.3f} nats)"
                if not paired.different:
                    verdict = f"not distinguishable by its paired per-window difference {size}"
                else:
                    direction = "lower" if paired.mean < 0 else "higher"
                    verdict = f"{direction} by its paired per-window difference {size}"
            findings.append(f"- {model}: centring the keys of {base['label']}: ratio {change}, {verdict}.")
        best = _frontier(mine)
        if len(best):
            ratio = "perplexity_ratio"
            steps = "; ".join(
                f"{row['stored_bits']:.2f} bits: {row['label']} {plus_minus(row[ratio], se_of(row, ratio))}"
                for _, row in best.iterrows()
            )
            findings.append(
                f"- {model}: the lowest measured ratio at each budget (stored bits per coordinate; "
                f"neighbours may not be distinguishable, see the paired tests above): {steps}."
            )
    return findings


def write(inputs: ReportInputs) -> list[str]:
    """The cross-model section: each cache setting's perplexity ratio, KL and stored bits on every
    model (a figure per model, :data:`MODEL_FIGURE`), the key statistics behind them
    (:mod:`tq.report.key_stats`), and what holds on every model."""
    rows = _across_rows(inputs.table)
    if rows.empty:
        return ["No perplexity records: section omitted.", ""]
    out_dir = inputs.out_dir
    models = list(dict.fromkeys(rows["model"]))
    for model in models:
        _plot_model_quality(
            rows[rows["model"] == model], model, out_dir / f"{figure_name_of_model(model)}.png"
        )
    return [
        "Each cache setting of the sweep on each model: perplexity ratio (quantized / exact) and "
        "KL(exact || quantized) per scored token, ± one standard error with the window as the unit, "
        "and the bits stored per cached coordinate: codes plus every norm, scale, zero point, key "
        "mean and exact token (32 / the KV compression, measured on the context's cache).",
        "",
        _across_table(rows, models),
        "",
        *(f"![{model}]({figure_name_of_model(model)}.png)\n" for model in models),
        *key_stats_lines(inputs.key_stats, out_dir),
        *what_this_shows(_across_findings(rows, models, inputs.windows)),
    ]
