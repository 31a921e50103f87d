"""Section 3 of the report: perplexity of real text and KV memory per cache setting."""

from __future__ import annotations

from tq.report.flatten import WINDOW_SET
from tq.report.grouping import mean_by
from tq.report.inputs import ReportInputs
from tq.report.labels import LINE_SETTINGS, decode_first, protocol_label, setting_in_words, with_cache_labels
from tq.report.markdown import format_cell, markdown_table, what_this_shows, with_errors
from tq.report.rows import perplexity_rows
from tq.report.uncertainty import ranking, text_note
from tq.report.windows import window_sets

_PERPLEXITY_HEADERS = {
    "model": "model",
    "setting": "setting",
    "protocol": "protocol",
    "keys": "keys",
    "values": "values",
    "residual_length": "residual",
    "exact_layers": "exact layers",
    "exact_perplexity": "ppl exact",
    "quantized_perplexity": "ppl quantized",
    "perplexity_ratio": "ratio",
    "kl_divergence": "KL",
    "kl_divergence_median": "KL median",
    "kl_divergence_p99": "KL p99",
    "kl_divergence_max": "KL max",
    "top1_agreement": "top-1",
    "delta_p_mean": "Δp mean",
    "delta_p_rms": "Δp RMS",
    "kv_compression_ratio": "KV compression",
    "scored_tokens": "scored tokens",
    "records": "records",
}
# The perplexity metrics shown as "value ± SE" where the records have an SE.
_WITH_ERRORS = ("perplexity_ratio", "kl_divergence", "top1_agreement", "delta_p_mean", "delta_p_rms")


def write(inputs: ReportInputs) -> list[str]:
    """Section 3: the whole-model perplexity records per model, protocol and cache setting, with
    what the text and the ± are, and each model's settings ranked by their paired per-window
    differences (:func:`tq.report.uncertainty.ranking`)."""
    rows = perplexity_rows(inputs.table)
    if rows.empty:
        return ["No perplexity records: section omitted.", ""]
    windows = inputs.windows
    keys = [
        "model",
        "setting",
        "protocol",
        "key_strategy",
        "value_strategy",
        "key_bits",
        "value_bits",
        "bits",
        "group_size",
        *LINE_SETTINGS,
        *WINDOW_SET,
    ]
    metrics = [
        "exact_perplexity",
        "quantized_perplexity",
        "perplexity_ratio",
        "kl_divergence",
        "kl_divergence_median",
        "kl_divergence_p99",
        "kl_divergence_max",
        "top1_agreement",
        "delta_p_mean",
        "delta_p_rms",
        "kv_compression_ratio",
        "scored_tokens",
    ]
    means = decode_first(mean_by(rows, keys, metrics))
    several = means.groupby("model")[list(WINDOW_SET)].nunique(dropna=False).gt(1).any(axis=None)
    findings = [
        f"- {format_cell(model)}, {protocol_label(protocol)}"
        + (f", {window_sets(group, windows)}" if several else "")
        + f": perplexity ratio (best first): {ranking(group, setting_in_words, windows)}."
        for (model, protocol, *_), group in means.groupby(
            ["model", "protocol", *WINDOW_SET], dropna=False, sort=False
        )
    ]
    means = means.assign(protocol=means["protocol"].map(protocol_label))
    means = with_errors(with_cache_labels(means), _WITH_ERRORS)
    return [
        "Cross-entropy of real text with the exact and the quantized cache (see the protocols in "
        "the notes below; the decode protocol leads). KL(exact || quantized) per scored token in "
        "nats, its median, 99th percentile and maximum; Δp is p_quantized - p_exact of the text's "
        "next token (mean and RMS over the scored tokens).",
        "",
        text_note(rows, windows),
        "",
        "The figures of quality against stored bits, one per model, are in the cross-model section above.",
        "",
        markdown_table(
            means,
            {
                name: header
                for name, header in (
                    ({"sample_seed": "seed"} if several else {}) | _PERPLEXITY_HEADERS
                ).items()
                if name != "setting" or means["setting"].notna().any()
            },
        ),
        "",
        *what_this_shows(findings),
    ]
