# Evaluations of the quantized KV cache: on traces, in the decode loop (the exact runs and
# compare mode on the prompt suite) and as perplexity on the Wikipedia text.


rule trace_eval:
    input:
        rules.traces.output[0],
    output:
        f"results/trace_eval/{{model}}/layer{{layer}}-head{{head}}/{{cache}}.json",
    params:
        cache=cache_params,
        top_k=config["traces"]["top_k"],
        source_hash=script_code_hash("trace_eval.py"),
    log:
        f"results/logs/trace_eval/{{model}}/layer{{layer}}-head{{head}}/{{cache}}.log",
    benchmark:
        f"results/benchmarks/trace_eval/{{model}}/layer{{layer}}-head{{head}}/{{cache}}.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    threads: 1
    conda:
        CONDA_ENV
    script:
        "../scripts/trace_eval.py"


rule compare_exact:
    """The exact decode loop on the prompt suite: reference text, speed and KV size, and the exact
    runs (tokens and logits) that every compare job reads instead of running them again."""
    input:
        model=model_input,
        prompts=PROMPTS["file"],
    output:
        record="results/compare_exact/{model}/{suite}.json",
        reference="results/compare_exact/{model}/{suite}.reference.safetensors",
    params:
        engine=engine_params,
        limit=PROMPTS["limit"],
        max_new_tokens=PROMPTS["max_new_tokens"],
        top_k=PROMPTS["top_k"],
        prompt_format=PROMPTS["format"],
        source_hash=script_code_hash("real_model.py"),
    log:
        "results/logs/compare_exact/{model}/{suite}.log",
    benchmark:
        "results/benchmarks/compare_exact/{model}/{suite}.tsv"
    resources:
        mem_mb=job_mem_mb("compare_exact"),
        runtime=30,
        gpu=model_gpus,  # sbatch --gpus=1 for a cuda model
    threads: 2
    conda:
        CONDA_ENV
    script:
        "../scripts/real_model.py"


rule compare:
    """The quantized decode loop against the exact runs of rule compare_exact (teacher-forced and
    free-running)."""
    input:
        model=model_input,
        prompts=PROMPTS["file"],
        reference=rules.compare_exact.output.reference,
    output:
        f"results/compare/{{model}}/{{suite}}/{{cache}}.json",
    params:
        engine=engine_params,
        cache=cache_params,
        exact_layers=exact_layer_params,
        limit=PROMPTS["limit"],
        max_new_tokens=PROMPTS["max_new_tokens"],
        top_k=PROMPTS["top_k"],
        prompt_format=PROMPTS["format"],
        source_hash=script_code_hash("real_model.py"),
    log:
        f"results/logs/compare/{{model}}/{{suite}}/{{cache}}.log",
    benchmark:
        f"results/benchmarks/compare/{{model}}/{{suite}}/{{cache}}.tsv"
    resources:
        mem_mb=job_mem_mb("compare"),
        runtime=30,
        gpu=model_gpus,  # sbatch --gpus=1 for a cuda model
    threads: 1  # one core each: two such jobs at once keep both cores busy (docs/pipeline.md, "Time")
    conda:
        CONDA_ENV
    script:
        "../scripts/real_model.py"


rule perplexity_exact:
    """The exact model's run on the perplexity windows (one per model and windows x window,
    context), read by every perplexity and per-layer job: they run only the quantized side."""
    input:
        model=model_input,
        corpus=rules.corpus.output.articles,
    output:
        "results/perplexity_exact/{model}/perplexity-s{seed}-{windows}x{window}-c{context}.safetensors",
    wildcard_constraints:
        seed=r"\d+",
        windows=r"\d+",
        window=r"\d+",
        context=r"\d+",
    params:
        engine=engine_params,
        source_hash=script_code_hash("perplexity_exact.py"),
    log:
        "results/logs/perplexity_exact/{model}/perplexity-s{seed}-{windows}x{window}-c{context}.log",
    benchmark:
        "results/benchmarks/perplexity_exact/{model}/perplexity-s{seed}-{windows}x{window}-c{context}.tsv"
    resources:
        mem_mb=job_mem_mb("perplexity_exact"),
        runtime=15,
        gpu=model_gpus,  # sbatch --gpus=1 for a cuda model
    threads: 2
    conda:
        CONDA_ENV
    script:
        "../scripts/perplexity_exact.py"


rule perplexity:
    """Perplexity with a cache setting (the quantized side; the exact one is the reference)."""
    input:
        model=model_input,
        reference=exact_perplexity_file("perplexity"),
    output:
        f"results/perplexity/{{model}}/{{cache}}.json",
    params:
        engine=engine_params,
        cache=cache_params,
        exact_layers=exact_layer_params,
        **perplexity_params("perplexity"),
        source_hash=script_code_hash("perplexity.py"),
    log:
        f"results/logs/perplexity/{{model}}/{{cache}}.log",
    benchmark:
        f"results/benchmarks/perplexity/{{model}}/{{cache}}.tsv"
    resources:
        mem_mb=job_mem_mb("perplexity"),
        runtime=30,
        gpu=model_gpus,  # sbatch --gpus=1 for a cuda model
    threads: 1  # one core each: two such jobs at once keep both cores busy (docs/pipeline.md, "Time")
    conda:
        CONDA_ENV
    script:
        "../scripts/perplexity.py"


rule layer_sensitivity:
    """Perplexity with only layer {layer} quantized (config layer_sensitivity), every other
    layer exact: which layers are sensitive to quantization."""
    input:
        model=model_input,
        reference=exact_perplexity_file("layer_sensitivity"),
    output:
        "results/layer_sensitivity/{model}/layer{layer}.json",
    params:
        engine=engine_params,
        cache=lambda wildcards: {
            name: config["layer_sensitivity"][name]
            for name in ("key_bits", "value_bits", "key_strategy", "value_strategy")
        }
        | cache_fields(CACHE_OPTIONS),
        quantized_layers=lambda wildcards: [int(wildcards.layer)],
        **perplexity_params("layer_sensitivity"),
        source_hash=script_code_hash("perplexity.py"),
    log:
        "results/logs/layer_sensitivity/{model}/layer{layer}.log",
    benchmark:
        "results/benchmarks/layer_sensitivity/{model}/layer{layer}.tsv"
    resources:
        mem_mb=job_mem_mb("layer_sensitivity"),
        runtime=15,
        gpu=model_gpus,  # sbatch --gpus=1 for a cuda model
    threads: 1  # one core each: two such jobs at once keep both cores busy (docs/pipeline.md, "Time")
    conda:
        CONDA_ENV
    script:
        "../scripts/perplexity.py"


if config["needle"]["bits"]:

    rule needle:
        """Needle-in-a-haystack retrieval with the exact cache and a TurboQuant MSE cache of each
        width in needle.bits: one job per model, so that each prompt's prefill (most of the cost
        at 4k tokens) and exact answer are computed once and shared by every width."""
        input:
            model=model_input,
            corpus=rules.corpus.output.text,
        output:
            [f"results/needle/{{model}}/b{bits_label(bits)}.json" for bits in config["needle"]["bits"]],
        params:
            engine=engine_params,
            caches=[
                {"key_bits": bits, "value_bits": bits, **cache_fields(CACHE_OPTIONS)}
                for bits in config["needle"]["bits"]
            ],
            context_lengths=config["needle"]["context_lengths"],
            depths=config["needle"]["depths"],
            trials=config["needle"]["trials"],
            max_new_tokens=config["needle"]["max_new_tokens"],
            seed=config["needle"]["seed"],
            source_hash=script_code_hash("needle.py"),
        log:
            "results/logs/needle/{model}.log",
        benchmark:
            "results/benchmarks/needle/{model}.tsv"
        resources:
            mem_mb=job_mem_mb("needle"),
            runtime=60,
            gpu=model_gpus,  # sbatch --gpus=1 for a cuda model
        threads: 2
        conda:
            CONDA_ENV
        script:
            "../scripts/needle.py"
