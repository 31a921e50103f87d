"""Section 2b of the report: next-token quality of the real models in compare mode against bits."""

from __future__ import annotations

import pandas as pd

from tq.report.grouping import column_or_nan
from tq.report.inputs import ReportInputs
from tq.report.markdown import format_cell, is_missing
from tq.report.quality_vs_bits import quality_section
from tq.report.rows import compare_rows

FIGURE = "quality_compare"


def few_scored_tokens(rows: pd.DataFrame) -> list[str]:
    """A warning naming the compare records whose exact answers left fewer than half of the
    possible tokens (prompts x max_new_tokens) to score; none when every record has enough."""
    rows = rows.assign(possible=column_or_nan(rows, "prompts") * column_or_nan(rows, "max_new_tokens"))
    few = rows[column_or_nan(rows, "scored_tokens") < 0.5 * rows["possible"]]
    if few.empty:
        return []
    ended = column_or_nan(few, "prompts_ended_at_once")
    cases = sorted(
        {
            f"{row['model']} ({format_cell(row['scored_tokens'])} of {format_cell(row['possible'])} tokens"
            + (f", {format_cell(count)} prompts ended at once" if not is_missing(count) else "")
            + ")"
            for (_, row), count in zip(few.iterrows(), ended, strict=True)
        }
    )
    return [
        f"**Few scored tokens.** {len(few)} of {len(rows)} compare records scored fewer than half "
        f"of the possible tokens (prompts x max_new_tokens): {'; '.join(cases)}. Their figures rest "
        "on few tokens; an exact answer that ends at once (an instruct model given raw text, "
        "`prompts.format: raw`) is scored on one token.",
        "",
    ]


def write(inputs: ReportInputs) -> list[str]:
    """Section 2b: the compare records' next-token quality (top-1 agreement, KL, logit RMSE)
    against bits (:data:`FIGURE`), warning first of records that scored few tokens."""
    rows = compare_rows(inputs.table)
    section = quality_section(
        rows,
        "No real-model compare records: section omitted.",
        FIGURE,
        [
            ("top1_agreement", "top-1 agreement", False),
            ("kl_divergence", "KL(exact || quantized)", True),
            ("logit_rmse", "logit RMSE", True),
        ],
        {
            "token_match_rate": "free-run token match",
            "divergence_rate": "prompts diverged",
            "quantized_kv.kv_compression_ratio": "KV compression",
            "scored_tokens": "scored tokens",
        },
        inputs.out_dir,
        "Teacher-forced comparison of the quantized cache with the exact one on the exact run's "
        "greedy tokens (a drift measure); free-running columns decode on their own. ± and the error "
        "bars are one standard error with the prompt as the unit (the tokens of one answer are not "
        "independent), over the record's prompts; the per-token SE is `<name>_se_token` in "
        "summary.csv. `scored tokens` is the exact answers' length (per record): at most prompts x "
        "max_new_tokens.",
        unit="prompt",
    )
    # The warning goes right under the title, before the figures it qualifies.
    return [*few_scored_tokens(rows), *section]
