"""Section 7 of the report: ablations, the settings that keep part of the cache exact."""

from __future__ import annotations

import pandas as pd

from tq.report.flatten import WINDOW_SET
from tq.report.grouping import column_or_nan
from tq.report.inputs import ReportInputs
from tq.report.labels import method_name, protocol_label, with_cache_labels
from tq.report.markdown import format_cell, is_missing, markdown_table, plus_minus, se_of, what_this_shows
from tq.report.real_quality import QUALITY_HEADERS, real_quality, shown_quality
from tq.report.uncertainty import not_distinguishable, paired_nll
from tq.report.windows import WindowValues


def _same_window_set(table: pd.DataFrame, row: pd.Series) -> pd.Series:
    """Which rows of ``table`` were scored on the window set of ``row`` (:data:`WINDOW_SET`)."""
    same = pd.Series(True, index=table.index)
    for name in WINDOW_SET:
        column = column_or_nan(table, name)
        same &= column.isna() if is_missing(row.get(name)) else column.eq(row.get(name)).fillna(False)
    return same.astype(bool)


def _ablation_what(row: pd.Series) -> tuple[str, set[str], set[float]]:
    """What an ablation keeps exact, in words, with the strategies and widths it quantizes with."""
    parts = [
        ("keys", row["key_strategy"], row["key_bits"]),
        ("values", row["value_strategy"], row["value_bits"]),
    ]
    quantized = [(name, strategy, bits) for name, strategy, bits in parts if strategy != "exact"]
    what = []
    if len(quantized) == 1:
        what.append(f"only {quantized[0][0]} quantized")
    if pd.notna(row["residual_length"]) and row["residual_length"] > 0:
        what.append(f"last {format_cell(row['residual_length'])} tokens exact")
    if pd.notna(row["exact_layers"]) and row["exact_layers"] != "none":
        what.append(f"layers {row['exact_layers']} exact")
    return ", ".join(what), {strategy for _, strategy, _ in quantized}, {bits for _, _, bits in quantized}


def _against_whole_cache(row: pd.Series, reference: pd.DataFrame, windows: WindowValues) -> str:
    """An ablation's ratio against the same quantizer on the whole cache (one reference row), with
    whether their paired per-window difference tells them apart (:func:`paired_nll`); empty
    without a reference."""
    ratio = "perplexity_ratio"
    if len(reference) != 1 or pd.isna(reference[ratio].iloc[0]):
        return ""
    other = reference.iloc[0]
    found = [windows.of(row), windows.of(other)]
    paired = paired_nll(*found)
    if paired is not None and paired.different:
        verdict = "lower" if paired.mean < 0 else "higher"
    else:
        verdict = not_distinguishable(found)
    return (
        f" vs {plus_minus(other[ratio], se_of(other, ratio))} with the whole cache quantized "
        f"({other['stored_bits']:.2f} stored bits): {verdict}"
    )


def write(inputs: ReportInputs) -> list[str]:
    """Section 7: the settings that keep part of the cache exact
    (:func:`tq.report.real_quality.real_quality`), each against the same quantizer on the whole
    cache by their paired per-window differences."""
    quality = real_quality(inputs.table)
    ablations = quality[quality["ablation"]]
    if ablations.empty:
        return ["No ablation settings in the records: section omitted.", ""]
    plain = quality[~quality["ablation"]]
    findings = []
    for _, row in ablations.dropna(subset=["perplexity_ratio"]).iterrows():
        what, strategies, widths = _ablation_what(row)
        reference = plain[
            (plain["model"] == row["model"])
            & plain["protocol"].eq(row["protocol"]).fillna(False).astype(bool)
            & plain["key_strategy"].isin(strategies)
            & plain["value_strategy"].isin(strategies)
            & plain["key_bits"].isin(widths)
            & plain["value_bits"].isin(widths)
            & _same_window_set(plain, row)
        ]
        findings.append(
            f"- {format_cell(row['model'])}, {protocol_label(row['protocol'])}, {what} "
            f"({method_name(row)} at {'/'.join(format_cell(b) for b in sorted(widths))} bits): "
            f"perplexity ratio {plus_minus(row['perplexity_ratio'], se_of(row, 'perplexity_ratio'))} at "
            f"{row['stored_bits']:.2f} stored bits{_against_whole_cache(row, reference, inputs.windows)}."
        )
    headers = {
        "model": "model",
        "keys": "keys",
        "values": "values",
        "residual_length": "residual",
        "exact_layers": "exact layers",
        **QUALITY_HEADERS,
    }
    return [
        "Settings that keep part of the cache exact: keys-only or values-only quantization, a "
        "residual window of recent exact tokens, or exact first and last layers (config: `kv_caches` "
        "entries with an `exact` strategy, `residual_length`, `exact_first_layers`, "
        "`exact_last_layers`). Lower or higher means the paired per-window difference lies beyond its "
        "95% interval (section 3).",
        "",
        markdown_table(shown_quality(with_cache_labels(ablations)), headers),
        "",
        *what_this_shows(findings or ["- No ablation setting has a perplexity measurement."]),
    ]
