"""Prepare the ONNX bundle of a model from its Hugging Face checkpoint (tq.models.prepare_bundle)."""

import sys

from tq.models.prepare import prepare_bundle

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    prepare_bundle(model_dir=snakemake.input[0], out=snakemake.output[0], threads=snakemake.threads)
