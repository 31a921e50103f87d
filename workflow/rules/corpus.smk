# Corpus: the Wikipedia excerpt of the gensim wheel (tq.data.corpus), as plain text (traces, needle)
# and as its articles (the windows of perplexity and key statistics). The only rule that reads
# the cache or PyPI for it: a local rule, as compute nodes often cannot reach PyPI.


localrules:
    corpus,


rule corpus:
    output:
        text="results/corpus/wikipedia.txt",
        articles="results/corpus/wikipedia-articles.json",
    params:
        source_hash=script_code_hash("corpus.py"),
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
