"""The Wikipedia excerpt as plain text (tq.data.corpus.corpus_text, cached under $TQ_CACHE_DIR)."""

import sys

from tq.core.fileio import atomic_write_bytes
from tq.data.corpus import corpus_text

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    text = corpus_text()
    atomic_write_bytes(snakemake.output[0], text.encode("utf-8"))
    print(f"{len(text)} characters, {len(text.split())} words", file=log)
