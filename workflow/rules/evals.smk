# Evaluations of the quantized KV cache: on traces, in the decode loop (exact baseline and
# compare mode on the prompt suite) and as perplexity on the Wikipedia text.


rule trace_eval:
    input:
        rules.traces.output[0],
    output:
        f"results/trace_eval/{{model}}/layer{{layer}}-head{{head}}/{CACHE_PATTERN}.json",
    params:
        cache=cache_params,
        top_k=config["traces"]["top_k"],
        source_hash=tq_sources_hash("tq.bench.trace"),
    log:
        f"results/logs/trace_eval/{{model}}/layer{{layer}}-head{{head}}/{CACHE_PATTERN}.log",
    benchmark:
        f"results/benchmarks/trace_eval/{{model}}/layer{{layer}}-head{{head}}/{CACHE_PATTERN}.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    threads: 1
    conda:
        CONDA_ENV
    script:
        "../scripts/trace_eval.py"


rule baseline:
    """The exact decode loop on the prompt suite: reference text, speed and KV size."""
    input:
        bundle=rules.bundle.output[0],
        prompts=PROMPTS["file"],
    output:
        "results/baseline/{model}/{suite}.json",
    params:
        limit=PROMPTS["limit"],
        max_new_tokens=PROMPTS["max_new_tokens"],
        top_k=PROMPTS["top_k"],
        source_hash=tq_sources_hash("tq.bench.real_model", "tq.trace_export"),
    log:
        "results/logs/baseline/{model}/{suite}.log",
    benchmark:
        "results/benchmarks/baseline/{model}/{suite}.tsv"
    resources:
        mem_mb=4000,
        runtime=30,
    threads: 2
    conda:
        CONDA_ENV
    script:
        "../scripts/real_model.py"


rule compare:
    """Exact and quantized decode loops side by side (teacher-forced and free-running)."""
    input:
        bundle=rules.bundle.output[0],
        prompts=PROMPTS["file"],
    output:
        f"results/compare/{{model}}/{{suite}}/{CACHE_PATTERN}.json",
    params:
        cache=cache_params,
        exact_layers=exact_layer_params,
        limit=PROMPTS["limit"],
        max_new_tokens=PROMPTS["max_new_tokens"],
        top_k=PROMPTS["top_k"],
        source_hash=tq_sources_hash("tq.bench.real_model", "tq.trace_export"),
    log:
        f"results/logs/compare/{{model}}/{{suite}}/{CACHE_PATTERN}.log",
    benchmark:
        f"results/benchmarks/compare/{{model}}/{{suite}}/{CACHE_PATTERN}.tsv"
    resources:
        mem_mb=4000,
        runtime=30,
    threads: 2
    conda:
        CONDA_ENV
    script:
        "../scripts/real_model.py"


rule perplexity:
    input:
        bundle=rules.bundle.output[0],
        corpus=rules.corpus.output[0],
    output:
        f"results/perplexity/{{model}}/{CACHE_PATTERN}.json",
    params:
        cache=cache_params,
        exact_layers=exact_layer_params,
        protocol=config["perplexity"]["protocol"],
        windows=config["perplexity"]["windows"],
        window=config["perplexity"]["window"],
        context=config["perplexity"]["context"],
        source_hash=tq_sources_hash("tq.bench.perplexity", "tq.corpus"),
    log:
        f"results/logs/perplexity/{{model}}/{CACHE_PATTERN}.log",
    benchmark:
        f"results/benchmarks/perplexity/{{model}}/{CACHE_PATTERN}.tsv"
    resources:
        mem_mb=4000,
        runtime=30,
    threads: 2
    conda:
        CONDA_ENV
    script:
        "../scripts/perplexity.py"


rule layer_sensitivity:
    """Perplexity with only layer {layer} quantized (config layer_sensitivity), every other
    layer exact: which layers are sensitive to quantization."""
    input:
        bundle=rules.bundle.output[0],
        corpus=rules.corpus.output[0],
    output:
        "results/layer_sensitivity/{model}/layer{layer}.json",
    params:
        cache=lambda wildcards: {
            name: config["layer_sensitivity"][name]
            for name in ("key_bits", "value_bits", "key_strategy", "value_strategy")
        }
        | cache_fields(CACHE_OPTIONS),
        quantized_layers=lambda wildcards: [int(wildcards.layer)],
        protocol=config["perplexity"]["protocol"],
        windows=config["layer_sensitivity"]["windows"],
        window=config["layer_sensitivity"]["window"],
        context=config["layer_sensitivity"]["context"],
        source_hash=tq_sources_hash("tq.bench.perplexity", "tq.corpus"),
    log:
        "results/logs/layer_sensitivity/{model}/layer{layer}.log",
    benchmark:
        "results/benchmarks/layer_sensitivity/{model}/layer{layer}.tsv"
    resources:
        mem_mb=4000,
        runtime=15,
    threads: 2
    conda:
        CONDA_ENV
    script:
        "../scripts/perplexity.py"


rule needle:
    """Needle-in-a-haystack retrieval with the exact and a {bits}-bit TurboQuant MSE cache."""
    input:
        bundle=rules.bundle.output[0],
        corpus=rules.corpus.output[0],
    output:
        "results/needle/{model}/b{bits}.json",
    wildcard_constraints:
        bits=BITS,
    params:
        cache=lambda wildcards: {
            "key_bits": _bits(wildcards.bits),
            "value_bits": _bits(wildcards.bits),
            **cache_fields(CACHE_OPTIONS),
        },
        context_lengths=config["needle"]["context_lengths"],
        depths=config["needle"]["depths"],
        trials=config["needle"]["trials"],
        max_new_tokens=config["needle"]["max_new_tokens"],
        seed=config["needle"]["seed"],
        source_hash=tq_sources_hash("tq.bench.needle"),
    log:
        "results/logs/needle/{model}/b{bits}.log",
    benchmark:
        "results/benchmarks/needle/{model}/b{bits}.tsv"
    resources:
        mem_mb=12000,
        runtime=60,
    threads: 2
    conda:
        CONDA_ENV
    script:
        "../scripts/needle.py"
