"""The models' per-layer key statistics (tq.tasks.key_stats) in the report: a subsection of the
cross-model section, on why TurboQuant breaks where it does."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tq.report.plotting import plain_log_y, save_png

FIGURE = "key_statistics"
# A key layer whose mean vector holds at least this share of the keys' energy is "offset-dominated".
OFFSET_SHARE = 0.9


def _key_stats_rows(key_stats: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per (model, layer) of the key statistics records (tq.tasks.key_stats)."""
    rows = [
        {
            "model": record["model"],
            "layer": layer["layer"],
            "key_share": layer["key"]["mean_energy_share"],
            "key_rms_ratio": layer["key"]["channel_rms_ratio"],
            "key_norm": layer["key"]["mean_norm"],
            "value_share": layer["value"]["mean_energy_share"],
        }
        for record in key_stats
        for layer in record["layers"]
    ]
    return pd.DataFrame.from_records(
        rows, columns=["model", "layer", "key_share", "key_rms_ratio", "key_norm", "value_share"]
    ).astype({"key_share": float, "key_rms_ratio": float, "key_norm": float, "value_share": float})


def _plot_key_stats(stats: pd.DataFrame, path: Path) -> None:
    """Per layer of each model: the share of the keys' energy in their mean, and the largest /
    median channel RMS (log scale)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(12.0, 4.4))
    axes = figure.subplots(1, 2)
    figure.subplots_adjust(left=0.07, right=0.8, bottom=0.13, top=0.86, wspace=0.28)
    for model, group in stats.groupby("model", sort=False):
        axes[0].plot(group["layer"], group["key_share"], marker="o", markersize=4, label=str(model))
        axes[1].plot(group["layer"], group["key_rms_ratio"], marker="o", markersize=4, label=str(model))
    axes[0].axhline(OFFSET_SHARE, color="k", linewidth=0.8, linestyle="--")
    axes[0].set_ylim(0, 1.02)
    axes[0].set_title(f"share of the keys' energy in their mean (dashed: {OFFSET_SHARE})", fontsize=10)
    axes[0].set_ylabel("share")
    plain_log_y(axes[1])
    axes[1].set_title("largest / median channel RMS of the keys", fontsize=10)
    axes[1].set_ylabel("ratio")
    for axis in axes:
        axis.set_xlabel("layer")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center left", bbox_to_anchor=(0.81, 0.5), fontsize=8, frameon=False)
    save_png(figure, path)


def key_stats_lines(key_stats: Sequence[dict[str, Any]], out_dir: Path) -> list[str]:
    """The subsection "Why: the keys per layer" of the cross-model section: its figure
    (:data:`FIGURE`, saved in ``out_dir``) and a table of each model's offset-dominated key
    layers; nothing without key statistics records."""
    stats = _key_stats_rows(key_stats)
    if stats.empty:
        return []
    _plot_key_stats(stats, out_dir / f"{FIGURE}.png")
    lines = [
        "### Why: the keys per layer",
        "",
        "Per layer, over every token of "
        + ", ".join(
            f"{record['model']} ({record['windows']} windows x {record['window']} tokens)"
            for record in key_stats
        )
        + ": the share of the cached keys' energy that is their per-head mean vector (tq.tasks.key_stats), "
        "and how far the largest channel's RMS stands above the median channel's. TurboQuant "
        "quantizes each key's direction after a rotation; where nearly all of every key is one "
        "shared offset, the part that tells tokens apart is a small residual its error swamps "
        "(key mean-centring subtracts the offset first).",
        "",
        f"![key statistics]({FIGURE}.png)",
        "",
        "| model | layers | key share median | key share max (layer) | layers with share >= "
        f"{OFFSET_SHARE} | channel RMS ratio max (layer) | value share median |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, group in stats.groupby("model", sort=False):
        top = group.loc[group["key_share"].idxmax()]
        peak = group.loc[group["key_rms_ratio"].idxmax()]
        heavy = group[group["key_share"] >= OFFSET_SHARE]
        lines.append(
            f"| {model} | {len(group)} | {group['key_share'].median():.3f} | {top['key_share']:.3f} "
            f"({int(top['layer'])}) | "
            + (
                ", ".join(
                    f"{int(layer)} ({share:.3f})" for layer, share in heavy[["layer", "key_share"]].values
                )
                or "none"
            )
            + f" | {peak['key_rms_ratio']:.1f} ({int(peak['layer'])}) | {group['value_share'].median():.3f} |"
        )
    return [*lines, ""]
