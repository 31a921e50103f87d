"""The Wikipedia excerpt (cached under $TQ_CACHE_DIR) as plain text and as a checksummed file of
its articles (tq.data.corpus.write_corpus_files)."""

import sys

from tq.data.corpus import write_corpus_files

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    text = write_corpus_files(snakemake.output.text, snakemake.output.articles)
    print(f"{len(text)} characters, {len(text.split())} words", file=log)
