# Traces: one KvTrace per (model, layer, KV head), from windows of the Wikipedia text, captured
# with transformers from the model's checkpoint (on its device, in its dtype).


rule traces:
    input:
        model=checkpoint_input,
        corpus=rules.corpus.output.text,
    output:
        "results/traces/{model}/layer{layer}-head{head}.safetensors",
    params:
        engine=engine_params,
        samples=config["traces"]["samples"],
        max_seq=config["traces"]["max_seq"],
        queries_per_sample=config["traces"]["queries_per_sample"],
        source_hash=script_code_hash("traces.py"),
    log:
        "results/logs/traces/{model}/layer{layer}-head{head}.log",
    benchmark:
        "results/benchmarks/traces/{model}/layer{layer}-head{head}.tsv"
    resources:
        mem_mb=job_mem_mb("traces"),
        runtime=10,
        gpu=model_gpus,  # sbatch --gpus=1 for a cuda model
    threads: 1
    conda:
        CONDA_ENV
    script:
        "../scripts/traces.py"
