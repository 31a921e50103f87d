"""The headline of the report: each cache setting's quality and KV compression at a glance."""

from __future__ import annotations

import pandas as pd

from tq.report.flatten import WINDOW_SET
from tq.report.grouping import column_or_nan, mean_by
from tq.report.inputs import ReportInputs
from tq.report.labels import decode_first, protocol_label, setting_in_words, with_cache_labels
from tq.report.markdown import format_cell, markdown_table, plus_minus, se_of, what_this_shows, with_errors
from tq.report.rows import compare_rows, perplexity_rows
from tq.report.uncertainty import against_exact, se_units


def _headline_findings(means: pd.DataFrame) -> list[str]:
    """Per model and measure, how many settings have a perplexity ratio not distinguishable from
    1.0 (exact) by their own paired difference with the window or prompt as the unit
    (:func:`against_exact`), and which."""
    findings = []
    ratio = "perplexity_ratio"
    for (model, measure), group in means.groupby(["model", "measure"], dropna=False, sort=False):
        if group[ratio].isna().all():
            continue
        tested = group[[against_exact(row) is not None for _, row in group.iterrows()]]
        if tested.empty:
            findings.append(
                f"- {format_cell(model)}, {measure}: no standard errors recorded, nothing tested."
            )
            continue
        exact_like = [
            f"{setting_in_words(row)} ({plus_minus(row[ratio], se_of(row, ratio))})"
            for _, row in tested.iterrows()
            if not against_exact(row)
        ]
        findings.append(
            f"- {format_cell(model)}, {measure}: {len(exact_like)} of {len(tested)} settings have a "
            f"perplexity ratio not distinguishable from 1.0 (exact) on {se_units(tested)}"
            + (": " + "; ".join(exact_like) if exact_like else "")
            + "."
        )
    return findings


def write(inputs: ReportInputs) -> list[str]:
    """The headline: per model and bit width, the perplexity ratio, top-1 agreement, KL and KV
    compression of every cache setting (perplexity and compare records), and which settings are
    not distinguishable from the exact cache."""
    table = inputs.table
    kinds = []
    perplexity = perplexity_rows(table)
    if not perplexity.empty:
        kinds.append(
            perplexity.assign(
                measure=[f"perplexity ({protocol_label(p)})" for p in perplexity["protocol"]],
                kv=column_or_nan(perplexity, "kv_compression_ratio"),
            )
        )
    compare = compare_rows(table)
    if not compare.empty:
        kinds.append(
            compare.assign(
                measure="compare (teacher-forced)",
                kv=column_or_nan(compare, "quantized_kv.kv_compression_ratio"),
            )
        )
    if not kinds:
        return ["No perplexity or real-model compare records: headline omitted.", ""]
    rows = pd.concat(kinds, ignore_index=True)
    keys = [
        "model",
        "setting",
        "bits",
        "key_strategy",
        "value_strategy",
        "key_bits",
        "value_bits",
        "residual_length",
        "exact_layers",
        "group_size",
        "protocol",
        "measure",
        "workload",
        *WINDOW_SET,
    ]
    quality = ["perplexity_ratio", "top1_agreement", "kl_divergence"]
    means = decode_first(mean_by(rows, keys, [*quality, "kv", "scored_tokens", "prompts"]))
    findings = _headline_findings(means)
    means = with_errors(with_cache_labels(means), quality)
    headers = {
        "model": "model",
        "bits": "bits",
        "keys": "keys",
        "values": "values",
        "residual_length": "residual",
        "exact_layers": "exact layers",
        "measure": "measured by",
        "perplexity_ratio": "perplexity ratio",
        "top1_agreement": "top-1 agreement",
        "kl_divergence": "KL",
        "kv": "KV compression",
        "records": "records",
    }
    return [
        "Per model and bit width: perplexity ratio (quantized / exact), top-1 agreement "
        "and KL(exact || quantized) of the next-token distribution, and KV-cache compression "
        "against fp32 (all stored bytes counted); the decode protocol leads. ± is one standard "
        "error with the text window as the unit for perplexity (section 3) and the prompt for "
        "compare mode (section 2b); a ratio is called distinguishable from exact when the 95% "
        "interval of its quantized - exact NLL difference per window (per prompt) excludes 0.",
        "",
        markdown_table(means, headers),
        "",
        *(what_this_shows(findings) if findings else []),
    ]
