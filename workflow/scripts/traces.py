"""Export one (layer, KV head) trace; each sample is a slice of the Wikipedia text."""

import shutil
import sys
import tempfile
from pathlib import Path

from tq.tasks.trace_export import export_traces

# Characters of text per sample: enough for max_seq tokens with any BPE tokenizer.
CHARS_PER_TOKEN = 8

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    import torch

    torch.set_num_threads(snakemake.threads)
    params = snakemake.params
    text = Path(snakemake.input.corpus).read_text(encoding="utf-8")
    size = params.max_seq * CHARS_PER_TOKEN
    prompts = [text[i * size : (i + 1) * size] for i in range(params.samples)]
    out = Path(snakemake.output[0])
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".traces-") as work:
        (written,) = export_traces(
            snakemake.input.model,
            prompts,
            layers=[int(snakemake.wildcards.layer)],
            heads=[int(snakemake.wildcards.head)],
            out_dir=work,
            max_seq=params.max_seq,
            queries_per_sample=params.queries_per_sample,
            model_name=snakemake.wildcards.model,
            device=params.engine["device"],
            dtype=params.engine["dtype"],
        )
        shutil.move(written, out)
