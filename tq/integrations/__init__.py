"""tq inside other libraries: :mod:`tq.integrations.transformers` (Hugging Face transformers,
the ``models`` extra)."""
