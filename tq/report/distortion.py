"""Section 1 of the report: the distortion of synthetic unit vectors against the paper's bounds."""

from __future__ import annotations

import pandas as pd

from tq.report.grouping import mean_by
from tq.report.inputs import ReportInputs
from tq.report.markdown import format_cell, markdown_table, what_this_shows
from tq.report.plotting import finish_axis, new_figure, plot_lines, save_png
from tq.report.rows import synthetic_rows

FIGURE = "distortion_vs_bits"


def write(inputs: ReportInputs) -> list[str]:
    """Section 1: the synthetic records' distortion against the paper's bounds, as a figure
    (:data:`FIGURE`), a table of means per dimension, strategy and width, and its findings."""
    rows = synthetic_rows(inputs.table)
    if rows.empty:
        return ["No synthetic records: section omitted.", ""]
    metrics = [
        "d_mse",
        "d_mse_expected",
        "d_mse_upper_bound",
        "d_mse_lower_bound",
        "ip_mse",
        "ip_bias",
        "d_prod_upper_bound",
        "d_prod_lower_bound",
        "compression_ratio",
    ]
    means = mean_by(rows, ["dim", "strategy", "bits"], metrics)
    prod = means[means["strategy"] == "prod"]
    figure, axes = new_figure(2 if len(prod) else 1)
    bounds = means.groupby("bits")[["d_mse_upper_bound", "d_mse_lower_bound"]].mean().reset_index()
    axis = axes[0]
    axis.plot(bounds["bits"], bounds["d_mse_upper_bound"], "k--", label="upper bound (√3π/2)·4^-b")
    axis.plot(bounds["bits"], bounds["d_mse_lower_bound"], "k:", label="lower bound 4^-b")
    plot_lines(
        axis,
        means,
        ["dim", "strategy"],
        "d_mse",
        lambda row: f"d={format_cell(row['dim'])} {row['strategy']} measured",
    )
    finish_axis(axis, "D_mse = E||x - x~||² (unit x)", "D_mse", means["bits"], log=True)
    if len(prod):
        axis = axes[1]
        plot_lines(axis, prod, ["dim"], "ip_mse", lambda row: f"d={format_cell(row['dim'])} prod measured")
        for bound, label, style in (
            ("d_prod_upper_bound", "upper bound √3π²/d·4^-b", "--"),
            ("d_prod_lower_bound", "lower bound 4^-b/d", ":"),
        ):
            plot_lines(
                axis,
                prod,
                ["dim"],
                bound,
                lambda row, label=label: f"d={format_cell(row['dim'])} {label}",
                linestyle=style,
            )
        finish_axis(axis, "D_prod = E(<q,x> - <q,x~>)² (Prod)", "D_prod", prod["bits"], log=True)
    save_png(figure, inputs.out_dir / f"{FIGURE}.png")
    headers = {
        "dim": "d",
        "strategy": "strategy",
        "bits": "bits",
        "d_mse": "D_mse",
        "d_mse_expected": "D_mse Lloyd-Max",
        "d_mse_lower_bound": "lower 4^-b",
        "d_mse_upper_bound": "upper",
        "ip_mse": "D_prod (ip MSE)",
        "d_prod_upper_bound": "D_prod upper",
        "d_prod_lower_bound": "D_prod lower",
        "ip_bias": "ip bias",
        "compression_ratio": "compression",
        "records": "records",
    }
    return [
        "Measured distortion of unit vectors against the paper's bounds (log scale), the paper's "
        "distortion figure: D_mse of TurboQuant MSE against (√3π/2)·4^-b and 4^-b, D_prod of "
        "TurboQuant Prod against √3π²/d·4^-b and 4^-b/d. For Prod, D_mse is that of its "
        "reconstruction; D_prod is the inner-product error for unit queries.",
        "",
        f"![distortion vs bits]({FIGURE}.png)",
        "",
        markdown_table(means, headers),
        "",
        *_distortion_findings(means),
    ]


def _distortion_findings(means: pd.DataFrame) -> list[str]:
    """What the distortion table shows, computed from it: where each measured distortion lies
    between its bounds (as multiples of the lower bound)."""
    findings = []
    checks = (
        ("mse", "d_mse", "d_mse_lower_bound", "d_mse_upper_bound", "D_mse of MSE"),
        ("prod", "ip_mse", "d_prod_lower_bound", "d_prod_upper_bound", "D_prod of Prod"),
    )
    for strategy, measured, lower, upper, name in checks:
        rows = means[(means["strategy"] == strategy)].dropna(subset=[measured, lower, upper])
        if rows.empty:
            continue
        ratio = rows[measured] / rows[lower]
        inside = int(((rows[measured] >= rows[lower]) & (rows[measured] <= rows[upper])).sum())
        widths = ", ".join(format_cell(b) for b in sorted(rows["bits"].unique()))
        dims = ", ".join(format_cell(d) for d in sorted(rows["dim"].unique()))
        findings.append(
            f"- {name} (d = {dims}; b = {widths}): within both bounds in {inside} of {len(rows)} "
            f"settings; measured / lower bound = {ratio.min():.2f} to {ratio.max():.2f} "
            f"(the upper bound is {rows[upper].iloc[0] / rows[lower].iloc[0]:.2f}x the lower)."
        )
    return what_this_shows(findings) if findings else []
