"""ONNX export of a decoder with past key values, and the check that the export computes what
the model computes.

The export is optimum's, task ``text-generation-with-past``, float32. The graph is then saved
with its weights in one external data file (``model.onnx_data``), so that the graph can be read
and validated without reading the weights.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from tq.models.bundle import MODEL_ONNX, MODEL_ONNX_DATA, ModelBundle, past_name, present_name
from tq.models.errors import PrepareError

EXPORT_TASK = "text-generation-with-past"
# Initializers smaller than this many bytes stay inside model.onnx.
_EXTERNAL_THRESHOLD = 1024
# The check's tolerance on logits: |onnx - torch| <= CHECK_RTOL * max(1, max |torch logit|).
# Float32 exports of the models here agree to about 1e-5 of the logit scale; a wrong export
# (a mask, position or cache bug) differs by O(1).
CHECK_RTOL = 1e-3
CHECK_TEXT = "The capital of France is Paris, and the capital of Italy is Rome."


def export_onnx(model: Any, dest: str | Path, work_dir: str | Path | None = None) -> Path:
    """Export ``model`` (a float32 causal LM) to ``dest/model.onnx`` plus ``dest/model.onnx_data``.

    Args:
        model: a transformers ``PreTrainedModel`` optimum can export.
        dest: the directory to write into.
        work_dir: where optimum's intermediate export goes (a temporary directory inside it).

    Returns:
        The path of ``model.onnx``.

    Raises:
        PrepareError: optimum cannot export this architecture.
    """
    import onnx
    import torch
    from optimum.exporters.onnx import onnx_export_from_model

    target = Path(dest) / MODEL_ONNX
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="tq-onnx-export-") as raw:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notices
            try:
                onnx_export_from_model(model, raw, task=EXPORT_TASK, do_validation=False)
            except ValueError as error:
                raise PrepareError(f"optimum cannot export this model: {error}") from None
        proto = onnx.load(str(Path(raw) / MODEL_ONNX))
    onnx.save_model(
        proto,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=MODEL_ONNX_DATA,
        size_threshold=_EXTERNAL_THRESHOLD,
    )
    return target


def decoder_feeds(
    bundle: ModelBundle, token_ids: list[int], past: dict[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    """ONNX Runtime feeds for one call on a batch of one sequence.

    Args:
        bundle: the bundle whose graph is fed (its optional inputs decide what is fed).
        token_ids: the new tokens, [seq].
        past: the previous call's outputs by name (``present.N.key`` ...), or ``None`` for an
            empty cache.

    Returns:
        ``input_ids`` int64 [1, seq]; the past, float32 [1, kv_heads, past_seq, head_dim] per
        layer and kind; and the optional inputs the graph has: ``attention_mask`` ones [1,
        past_seq + seq], ``position_ids`` [1, seq] and ``cache_position`` [seq] counting from
        past_seq, ``use_cache_branch`` [past_seq > 0].
    """
    seq = len(token_ids)
    empty = np.zeros((1, bundle.kv_heads, 0, bundle.head_dim), dtype=np.float32)
    feeds = {"input_ids": np.asarray([token_ids], dtype=np.int64)}
    for layer in range(bundle.num_layers):
        for kind in ("key", "value"):
            feeds[past_name(layer, kind)] = empty if past is None else past[present_name(layer, kind)]
    past_seq = feeds[past_name(0, "key")].shape[2]
    positions = np.arange(past_seq, past_seq + seq, dtype=np.int64)
    if bundle.has_attention_mask:
        feeds["attention_mask"] = np.ones((1, past_seq + seq), dtype=np.int64)
    if bundle.has_position_ids:
        feeds["position_ids"] = positions[None, :]
    if bundle.has_cache_position:
        feeds["cache_position"] = positions
    if bundle.has_use_cache_branch:
        feeds["use_cache_branch"] = np.array([past_seq > 0])
    return feeds


def check_export(bundle: ModelBundle, model: Any, threads: int | None = None) -> dict[str, float | int]:
    """Check that the bundle's graph computes the model's logits, cache included: tokenize
    ``CHECK_TEXT`` with the bundle's tokenizer, prefill all tokens but the last with ONNX Runtime,
    feed the last one with the returned cache, and compare every position's logits with one
    torch forward pass over all tokens.

    Returns:
        ``{"tokens": n, "max_abs_logit_diff": ..., "max_abs_logit": ...}``.

    Raises:
        PrepareError: the logits differ by more than ``CHECK_RTOL`` of their scale.
    """
    import torch

    ids = bundle.encode(CHECK_TEXT)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].float().numpy()
    session = bundle.session(threads)
    names = list(bundle.output_names)
    prefill = dict(zip(names, session.run(names, decoder_feeds(bundle, ids[:-1], None)), strict=True))
    step = dict(zip(names, session.run(names, decoder_feeds(bundle, ids[-1:], prefill)), strict=True))
    actual = np.concatenate([prefill["logits"][0], step["logits"][0]])
    diff = float(np.max(np.abs(actual - expected)))
    scale = float(np.max(np.abs(expected)))
    if not diff <= CHECK_RTOL * max(1.0, scale):
        raise PrepareError(
            f"the ONNX export does not compute the model's logits: max |difference| {diff:.3g} "
            f"(logit scale {scale:.3g}) over {len(ids)} tokens"
        )
    return {"tokens": len(ids), "max_abs_logit_diff": diff, "max_abs_logit": scale}
