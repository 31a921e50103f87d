"""The real-model quality of each cache setting, perplexity and compare mode joined: the table
sections 6 (baselines) and 7 (ablations) read."""

from __future__ import annotations

import pandas as pd

from tq.report.flatten import WINDOW_SET
from tq.report.grouping import mean_by
from tq.report.labels import decode_first, method_name, protocol_label
from tq.report.markdown import with_errors
from tq.report.rows import compare_rows, perplexity_rows

# The columns of :func:`real_quality` both sections show, with their headers.
QUALITY_HEADERS = {
    "protocol": "protocol",
    "perplexity_ratio": "ppl ratio",
    "top1_agreement": "top-1 (compare)",
    "kl_divergence": "KL (ppl text)",
    "stored_bits": "stored bits/coord",
}


def _is_ablation(row: pd.Series) -> bool:
    """A setting that keeps part of the cache exact: a stream, a residual window or layers."""
    return bool(
        "exact" in (row["key_strategy"], row["value_strategy"])
        or (pd.notna(row["residual_length"]) and row["residual_length"] > 0)
        or (pd.notna(row["exact_layers"]) and row["exact_layers"] != "none")
    )


def real_quality(table: pd.DataFrame) -> pd.DataFrame:
    """Per model, perplexity protocol and cache setting (decode protocol first): perplexity ratio,
    KL, scored tokens and stored bits from the perplexity records, top-1 agreement from compare
    mode (teacher-forced, joined to every protocol and window set of the same setting); standard
    errors where the records have them."""
    keys = [
        "model",
        "setting",
        "key_strategy",
        "value_strategy",
        "key_bits",
        "value_bits",
        "bits",
        "residual_length",
        "exact_layers",
        "group_size",
    ]
    perplexity = mean_by(
        perplexity_rows(table),
        [*keys, "protocol", *WINDOW_SET],
        ["perplexity_ratio", "kl_divergence", "kv_compression_ratio", "scored_tokens"],
    )
    top1 = mean_by(compare_rows(table), keys, ["top1_agreement"]).drop(columns="records")
    merged = perplexity.drop(columns="records").merge(top1, on=keys, how="outer")
    merged["stored_bits"] = 32.0 / merged["kv_compression_ratio"]
    merged["method"] = merged.apply(method_name, axis=1)
    merged["ablation"] = merged.apply(_is_ablation, axis=1)
    return decode_first(merged)


def shown_quality(quality: pd.DataFrame) -> pd.DataFrame:
    """Rows of :func:`real_quality` as the tables show them: "value ± SE", protocols named."""
    quality = quality.assign(protocol=quality["protocol"].map(protocol_label))
    return with_errors(quality, ["perplexity_ratio", "top1_agreement", "kl_divergence"])
