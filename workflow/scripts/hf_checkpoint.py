"""Write a preset's float32 Hugging Face checkpoint directory (weights, config, tokenizer)."""

import sys
from pathlib import Path

from tq.models.prepare import write_hf_checkpoint

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    import torch

    torch.set_num_threads(snakemake.threads)
    write_hf_checkpoint(snakemake.wildcards.preset, Path(snakemake.output[0]))
