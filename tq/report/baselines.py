"""Section 6 of the report: TurboQuant compared with the baselines at equal bits."""

from __future__ import annotations

from tq.report.flatten import WINDOW_SET
from tq.report.inputs import ReportInputs
from tq.report.labels import decode_first, protocol_label
from tq.report.markdown import format_cell, markdown_table, what_this_shows
from tq.report.real_quality import QUALITY_HEADERS, real_quality, shown_quality
from tq.report.uncertainty import ranking


def write(inputs: ReportInputs) -> list[str]:
    """Section 6: TurboQuant against the baselines at equal code bits, whole cache quantized
    (:func:`tq.report.real_quality.real_quality`), each width's methods ranked by their paired
    per-window differences."""
    quality = real_quality(inputs.table)
    quality = quality[~quality["ablation"]]
    if quality.empty or quality["method"].nunique() < 2:
        return ["Fewer than two quantization methods in the records: section omitted.", ""]
    quality = decode_first(quality.sort_values(["model", "bits", "perplexity_ratio"], na_position="last"))
    headers = {"model": "model", "bits": "code bits", "method": "method", **QUALITY_HEADERS}
    findings = []
    by = ["model", "protocol", "bits", *WINDOW_SET]
    for (model, protocol, bits, *_), group in quality.groupby(by, dropna=False, sort=False):
        ranked = group.dropna(subset=["perplexity_ratio"])
        if ranked["method"].nunique() < 2:
            continue
        order = ranking(
            ranked, lambda row: f"{row['method']} ({row['stored_bits']:.2f} stored bits)", inputs.windows
        )
        findings.append(
            f"- {format_cell(model)}, {protocol_label(protocol)}, {format_cell(bits)} code bits, perplexity "
            f"ratio (best first): {order}."
        )
    return [
        "TurboQuant against the baselines on the same model, prompts and text. `code bits` are the "
        "bits of codes per coordinate; `stored bits/coord` count everything stored (norms, scales, "
        "zero points, outlier channel indices) over the context's fp32 size, as 32 / KV compression. "
        "Perplexity contexts are long (the `perplexity` config); compare-mode prompts are mostly "
        "short, and KIVI-style keeps up to `group_size` - 1 recent keys exact, so on short prompts "
        "its top-1 mostly measures exact keys: the perplexity columns are the fairer comparison. "
        "In a ranking, `<` separates settings whose paired per-window difference lies beyond its 95% "
        "interval (section 3); `≈` joins settings the records cannot tell apart.",
        "",
        markdown_table(shown_quality(quality), headers),
        "",
        *what_this_shows(findings or ["- No bit width has two methods measured on the same model."]),
    ]
