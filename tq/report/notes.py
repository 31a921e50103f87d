"""The closing section of the report: what these numbers mean, and what they do not."""

from __future__ import annotations

from tq.report.inputs import ReportInputs
from tq.report.labels import decode_first
from tq.report.uncertainty import text_note

HONEST_NOTE = """\
- **Attention is still float.** In the real-model runs ONNX Runtime computes ordinary float
  attention over the *reconstruction* of the quantized cache. What is quantized is what the
  cache stores between calls; there is no quantized attention kernel, so decode speed here says
  nothing about a fused kernel's speed.
- **The current call's own keys and values are exact.** The graph computes them within the call
  and uses them for that call's attention; they are quantized as they enter the cache and only
  later calls see the quantized versions. A long prefill therefore attends to itself exactly.
- **Stored bits count everything.** Compression ratios divide fp32 bytes by every byte the cache
  keeps: codes, per-vector norms (and Prod's residual norms and sign bits), and any tokens or
  layers kept exact. The nominal code width (`bits`) is not the storage cost.
- **Teacher-forced cross-entropy is a drift measure.** In compare mode the quantized run is scored
  on the exact run's own greedy tokens: its "perplexity" measures how far the quantized model
  drifts from the exact one, not how well either predicts a dataset. Only the perplexity section
  scores real text."""

# What each perplexity protocol measures, said in the notes of a report that used it.
PROTOCOL_NOTES = {
    "window": "`window` (quantized context only): the context is prefilled in one call and stored in "
    "the cache (quantized or not); the scored continuation is fed in one more call, so it reads the "
    "context through the cache but attends to its own tokens exactly. It measures a quantized context "
    "only, which flatters the cache (docs/design.md section 10).",
    "decode": "`decode` (docs/design.md section 10): the context is prefilled, then the continuation is "
    "decoded one token at a time with teacher forcing, every new token's keys and values quantized "
    "as they enter the cache, as a decoding server with a quantized cache would see it.",
}


def write(inputs: ReportInputs) -> list[str]:
    """The closing notes: what the figures measure and what they do not (:data:`HONEST_NOTE`),
    the text and the ± of the perplexity records, and the perplexity protocols used."""
    table = inputs.table
    lines = [HONEST_NOTE]
    perplexity = table[table["workload"] == "perplexity"]
    if not perplexity.empty:
        lines.append(f"- {text_note(perplexity, inputs.windows)}")
    lines.append("")
    used = table.loc[table["workload"] == "perplexity", ["protocol"]].dropna().drop_duplicates()
    protocols = list(decode_first(used.sort_values("protocol"))["protocol"])
    if protocols:
        lines.append(f"Perplexity protocol{'s' if len(protocols) > 1 else ''} used in this report:")
        lines += [f"- {PROTOCOL_NOTES.get(protocol, f'`{protocol}`')}" for protocol in protocols]
    else:
        lines.append("No perplexity records, so no perplexity protocol was used.")
    return [*lines, ""]
