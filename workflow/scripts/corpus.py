"""The Wikipedia excerpt (cached under $TQ_CACHE_DIR) as plain text (tq.data.corpus.corpus_text)
and as a checksummed file of its articles (tq.data.corpus.write_corpus_file)."""

import sys

from tq.core.fileio import atomic_write_bytes
from tq.data.corpus import corpus_text, write_corpus_file

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    text = corpus_text()
    atomic_write_bytes(snakemake.output.text, text.encode("utf-8"))
    write_corpus_file(snakemake.output.articles)
    print(f"{len(text)} characters, {len(text.split())} words", file=log)
