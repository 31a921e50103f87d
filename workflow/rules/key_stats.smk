# Key statistics: per layer, how much of the cached keys' (and values') energy is an offset shared
# by every token, and how uneven their channels are (tq.tasks.key_stats), from the model's checkpoint on
# windows drawn across the Wikipedia articles. Explains where TurboQuant's keys collapse.


rule key_stats:
    input:
        model=checkpoint_input,
        corpus=rules.corpus.output.articles,
    output:
        "results/key_stats/{model}.json",
    params:
        windows=config["key_stats"]["windows"],
        window=config["key_stats"]["window"],
        sample_seed=config["key_stats"]["sample_seed"],
        source_hash=script_code_hash("key_stats.py"),
    log:
        "results/logs/key_stats/{model}.log",
    benchmark:
        "results/benchmarks/key_stats/{model}.tsv"
    resources:
        mem_mb=job_mem_mb("key_stats"),
        runtime=15,
    threads: 2
    conda:
        CONDA_ENV
    script:
        "../scripts/key_stats.py"
