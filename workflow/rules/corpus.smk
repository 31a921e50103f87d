# Corpus: the Wikipedia excerpt of the gensim wheel as plain text (tq.data.corpus), for traces and
# perplexity. A local rule: it reads from PyPI (often unreachable from cluster compute nodes)
# and takes a second.


localrules:
    corpus,


rule corpus:
    output:
        "results/corpus/wikipedia.txt",
    params:
        source_hash=tq_sources_hash("tq.data.corpus"),
    log:
        "results/logs/corpus.log",
    benchmark:
        "results/benchmarks/corpus.tsv"
    resources:
        mem_mb=2000,
        runtime=15,
    threads: 1
    conda:
        CONDA_ENV
    script:
        "../scripts/corpus.py"
