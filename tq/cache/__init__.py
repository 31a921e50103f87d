"""Quantized KV caches: configuration, stores, named presets, packed views and attention."""
