"""Decode engines: one decode loop, two ways to run a model's forward calls.

- :mod:`tq.engines.registry`: the engines by name (``onnxruntime``, ``transformers``), the
  devices and dtypes each runs, what it reads, and how to open its runner (imports neither
  torch nor ONNX Runtime).
- :mod:`tq.engines.source`: :class:`~tq.engines.source.ModelSource`, a model directory and the
  engine, device and dtype that run it.
- :mod:`tq.engines.base`: :class:`~tq.engines.base.DecodeRunner`, the loop every engine shares
  (prefill, extend, greedy decoding, teacher forcing), and :class:`~tq.engines.base.Generation`.
- :mod:`tq.engines.onnx`: :class:`~tq.engines.onnx.OnnxRunner`, ONNX Runtime on an exported bundle.
- :mod:`tq.engines.transformers`: :class:`~tq.engines.transformers.TransformersRunner`, Hugging
  Face transformers on a checkpoint, with
- :mod:`tq.engines.transformers_cache`: :class:`~tq.engines.transformers_cache.TurboQuantCache`,
  tq's caches as a transformers ``Cache``, and the ``tq_packed`` attention.

Nothing is imported here: importing ``tq.engines`` loads neither torch nor ONNX Runtime.
"""
