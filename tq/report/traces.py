"""Section 2a of the report: attention quality on recorded KV traces against bits."""

from __future__ import annotations

from tq.report.inputs import ReportInputs
from tq.report.quality_vs_bits import quality_section

FIGURE = "quality_trace"


def write(inputs: ReportInputs) -> list[str]:
    """Section 2a: the trace records' attention quality (softmax KL, score RMSE, output error,
    top-k overlap) against bits, averaged over the traced layers and heads (:data:`FIGURE`)."""
    table = inputs.table
    return quality_section(
        table[table["workload"] == "trace"],
        "No trace records: section omitted.",
        FIGURE,
        [
            ("softmax_kl", "softmax KL (nats)", True),
            ("score_rmse", "score RMSE", True),
            ("output_relative_error", "output relative error", True),
            ("topk_overlap", "top-k overlap", False),
        ],
        {"compression_ratio": "compression", "stored_bits_per_coordinate": "stored bits/coord"},
        inputs.out_dir,
        "Attention of recorded queries over the exact and the quantized cache of one head, averaged "
        "over the traced layers and heads. `bits` is the mean code width of the quantized streams; "
        "caches with both streams exact are in the table only.",
        over=("trace", "layer", "head"),
    )
