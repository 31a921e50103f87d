# Aggregate every result record into one table (and the perplexity records' per-window and
# per-token values beside it), then the markdown report and its plots.

from tq.report import sweep_figures

# The report's figures, file stem -> (category, caption file in workflow/report/), as its sections
# draw them (tq.report.sections.REGISTRY): a per-model figure for each model, and a figure of an
# optional stage only when the sweep runs that stage.
FIGURES = sweep_figures(
    list(MODELS),
    {
        "layer_sensitivity": any("num_layers" in model for model in MODELS.values()),
        "needle": bool(config["needle"]["bits"]),
    },
)


localrules:
    aggregate,
    report,


rule aggregate:
    input:
        all_records,
    output:
        summary="results/summary.csv",
        per_window="results/per_window.csv",
        per_token="results/per_token.parquet",
    params:
        source_hash=script_code_hash("aggregate.py"),
    log:
        "results/logs/aggregate.log",
    benchmark:
        "results/benchmarks/aggregate.tsv"
    resources:
        mem_mb=1000,
        runtime=5,
    threads: 1
    conda:
        CONDA_ENV
    script:
        "../scripts/aggregate.py"


rule report:
    input:
        summary=rules.aggregate.output.summary,
        per_window=rules.aggregate.output.per_window,
        key_stats=expand("results/key_stats/{model}.json", model=MODELS),
    output:
        report(
            "results/report.md",
            caption="../report/report.rst",
            category="Report",
        ),
        *(
            report(f"results/{name}.png", caption=f"../report/{caption}.rst", category=category)
            for name, (category, caption) in FIGURES.items()
        ),
    params:
        source_hash=script_code_hash("report.py"),
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    resources:
        mem_mb=1000,
        runtime=5,
    threads: 1
    conda:
        CONDA_ENV
    script:
        "../scripts/report.py"
