"""Section 4 of the report: quantizer throughput on synthetic vectors and real-model decode speed."""

from __future__ import annotations

import pandas as pd

from tq.report.grouping import mean_by
from tq.report.inputs import ReportInputs
from tq.report.labels import stream_label
from tq.report.markdown import format_cell, markdown_table
from tq.report.plotting import finish_axis, new_figure, plot_lines, save_png
from tq.report.rows import synthetic_rows

FIGURE = "throughput"


def write(inputs: ReportInputs) -> list[str]:
    """Section 4: the quantizers' speed on synthetic vectors (:data:`FIGURE`) and the real models'
    decode and prefill speed, each part omitted without its records."""
    table = inputs.table
    lines: list[str] = []
    rows = synthetic_rows(table)
    if rows.empty:
        lines += ["No synthetic records: quantizer throughput omitted.", ""]
    else:
        speeds = [
            "timing.quantize_vectors_per_s",
            "timing.dequantize_vectors_per_s",
            "timing.inner_product_pairs_per_s",
        ]
        means = mean_by(rows, ["dim", "strategy", "kernels", "bits"], speeds)
        figure, axes = new_figure(2)
        for axis, name, title in zip(axes, speeds[:2], ("quantize", "dequantize"), strict=True):
            plot_lines(
                axis,
                means,
                ["dim", "strategy", "kernels"],
                name,
                lambda row: f"d={format_cell(row['dim'])} {row['strategy']} ({row['kernels']})",
            )
            finish_axis(axis, f"{title} (median, vectors/s)", "vectors / s", means["bits"], log=True)
        save_png(figure, inputs.out_dir / f"{FIGURE}.png")
        headers = {
            "dim": "d",
            "strategy": "strategy",
            "kernels": "kernels",
            "bits": "bits",
            "timing.quantize_vectors_per_s": "quantize vec/s",
            "timing.dequantize_vectors_per_s": "dequantize vec/s",
            "timing.inner_product_pairs_per_s": "inner products pairs/s",
            "records": "records",
        }
        lines += [
            "Quantizer speed on random unit vectors (median of repeats after a warm-up).",
            "",
            f"![throughput]({FIGURE}.png)",
            "",
            markdown_table(means, headers),
            "",
        ]
    real = table[table["workload"] == "real-model"]
    if real.empty:
        return [*lines, "No real-model records: decode speed omitted.", ""]
    keys = [
        "model",
        "setting",
        "mode",
        "key_strategy",
        "value_strategy",
        "key_bits",
        "value_bits",
        "residual_length",
        "exact_layers",
        "group_size",
        "threads",
    ]
    speeds = [
        "timing.exact.decode_tokens_per_s",
        "timing.quantized.decode_tokens_per_s",
        "timing.exact.prefill_seconds_mean",
        "timing.quantized.prefill_seconds_mean",
    ]
    means = mean_by(real, keys, speeds)
    means = means.assign(
        cache=[
            "-"
            if pd.isna(row["key_strategy"])
            else f"K {stream_label(row, 'key')} / V {stream_label(row, 'value')}"
            for _, row in means.iterrows()
        ]
    )
    headers = {
        "model": "model",
        "mode": "mode",
        "cache": "cache",
        "threads": "threads",
        "timing.exact.decode_tokens_per_s": "exact tok/s",
        "timing.quantized.decode_tokens_per_s": "quantized tok/s",
        "timing.exact.prefill_seconds_mean": "exact prefill s",
        "timing.quantized.prefill_seconds_mean": "quantized prefill s",
        "records": "records",
    }
    return [
        *lines,
        "Real-model decode speed (ONNX Runtime float attention over the reconstruction; see the notes).",
        "",
        markdown_table(means, headers),
        "",
    ]
