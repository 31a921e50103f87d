"""Decode engines: the shared decode loop, ONNX Runtime, and transformers with its cache."""
