# Synthetic: quality and speed of one quantizer on random unit vectors, d x b x strategy.


rule synthetic:
    output:
        "results/synthetic/d{dim}-b{bits}-{strategy}.json",
    wildcard_constraints:
        dim=r"\d+",
        bits=r"\d",
    params:
        n=config["synthetic"]["n"],
        repeats=config["synthetic"]["repeats"],
        seed=config["synthetic"]["seed"],
        rotation=config["synthetic"]["rotation"],
        device=config["synthetic"]["device"],
        source_hash=script_code_hash("synthetic.py"),
    log:
        "results/logs/synthetic/d{dim}-b{bits}-{strategy}.log",
    benchmark:
        "results/benchmarks/synthetic/d{dim}-b{bits}-{strategy}.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=1 if config["synthetic"]["device"] == "cuda" else 0,  # sbatch --gpus=1 on SLURM
    threads: 1
    conda:
        CONDA_ENV
    script:
        "../scripts/synthetic.py"
