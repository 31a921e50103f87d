"""Real models: presets (tq.models.presets), weight provisioning (provision), GGUF to Hugging Face
conversion (convert, tokenizer_repair), ONNX export (export), the prepared directory the decode
loop runs (bundle: ``ModelBundle``; prepare: ``prepare_bundle``) and Hugging Face checkpoints
(checkpoint). docs/design.md sections 4 and 5.

Nothing is imported here: a job that reads a checkpoint loads neither the exporter nor the
converter (tq.pipeline.sources).
"""
