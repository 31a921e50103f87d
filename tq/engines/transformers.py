"""The transformers engine: :class:`TransformersRunner` runs a Hugging Face checkpoint.

:class:`TransformersRunner` implements :class:`tq.engines.base.DecodeRunner` with a model loaded from a
local checkpoint (:class:`~tq.models.checkpoint.Checkpoint`) on the CPU or a CUDA GPU, in float32,
bfloat16 or float16, and :class:`~tq.engines.transformers_cache.TurboQuantCache` as the past: an
exact run keeps every layer exact (fp32 keys and values), a quantized one uses the cache
setting. The protocols are the base loop's, as for the ONNX Runtime engine
(:class:`tq.engines.onnx.OnnxRunner`): a call's tokens attend to their own exact keys and values
and to the earlier tokens' reconstruction, then enter the cache (here inside the call:
:meth:`~tq.engines.transformers_cache.TurboQuantLayer.update`). The model attends with SDPA over
the reconstruction (the cache's ``reconstruct`` path), or from the packed codes with
``attention="tq_packed"``; the cache lives on the model's device. On the CPU in float32 the
linear layers' weights are prepacked for oneDNN (:mod:`tq.engines.prepack`).

One difference from the ONNX engine: the past of a transformers call is the cache itself, which
grows with every call, so the tokens of :meth:`TransformersRunner.extend` always enter its past
(quantized when the past is a quantized cache), where the ONNX engine keeps them exact unless a
cache is given. The prompt runs in one call (no chunks: a later chunk would attend to an earlier
one's reconstruction).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from tq.cache.config import EXACT, CacheConfig
from tq.engines.base import DecodeRunner
from tq.engines.prepack import prepack_linears
from tq.engines.torch_device import check_device, torch_dtype, torch_setting_problem
from tq.engines.transformers_cache import ATTENTION, TurboQuantCache
from tq.models.checkpoint import Checkpoint, CheckpointError

ATTENTIONS = ("sdpa", ATTENTION)


class TransformersRunner(DecodeRunner):
    """Greedy decoding and teacher forcing of a Hugging Face checkpoint with tq's caches.

    Args:
        checkpoint: the model's checkpoint directory.
        device: ``cpu`` or ``cuda`` (the first GPU).
        dtype: the weights' and activations' type: ``float32``, ``bfloat16`` or ``float16``.
        threads: torch's intra-op threads (default: torch's choice).
        attention: ``sdpa`` (attend over the caches' float32 reconstruction) or ``tq_packed``
            (decode steps attend from the packed codes; the caches keep no float copy).

    Raises:
        ValueError: an unknown device, dtype or attention.
        RuntimeError: ``cuda`` on a machine without a CUDA GPU.
        CheckpointError: transformers cannot load the checkpoint.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: str = "cpu",
        dtype: str = "float32",
        threads: int | None = None,
        attention: str = "sdpa",
    ) -> None:
        from transformers import AutoModelForCausalLM

        problem = torch_setting_problem(device, dtype)
        if problem is not None:
            raise ValueError(problem)
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        check_device(device)
        if threads is not None:
            torch.set_num_threads(threads)
        self.files, self.name = checkpoint, checkpoint.name
        self.device = torch.device(device)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                checkpoint.path, dtype=torch_dtype(dtype), attn_implementation=attention
            )
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{checkpoint.path}: transformers cannot load it ({error})") from None
        self.model = model.to(self.device).eval()
        if device == "cpu" and dtype == "float32":
            prepack_linears(self.model)

    @classmethod
    def open(
        cls, path: str | os.PathLike, device: str = "cpu", dtype: str = "float32", threads: int | None = None
    ) -> TransformersRunner:
        """The runner of the checkpoint at ``path``."""
        return cls(Checkpoint.load(path), device, dtype, threads)

    def new_cache(
        self, config: CacheConfig, layer_configs: dict[int, CacheConfig] | None = None
    ) -> TurboQuantCache:
        """An empty :class:`TurboQuantCache` for this model (keeping its float32 reconstruction
        unless the model attends from the packed codes)."""
        return TurboQuantCache(self.model.config, config, layer_configs=layer_configs)

    def _empty_past(self, batch: int, cache: TurboQuantCache | None) -> TurboQuantCache:
        """``cache`` itself (the prompt's tokens enter it in the call), or an exact cache."""
        return cache if cache is not None else self.new_cache(EXACT)

    def _forward(self, ids: np.ndarray, past: TurboQuantCache) -> tuple[np.ndarray, TurboQuantCache]:
        """One forward call of ids int64 [batch, s] after ``past``, which takes them:
        (logits float32 [batch, s, vocab], ``past``)."""
        with torch.inference_mode():
            logits = self.model(
                input_ids=torch.from_numpy(ids).to(self.device), past_key_values=past, use_cache=True
            ).logits
        return logits.to(torch.float32).cpu().numpy(), past

    def _enter(
        self, cache: TurboQuantCache | None, before: TurboQuantCache, after: TurboQuantCache
    ) -> TurboQuantCache:
        """Nothing left to do: the past is the cache (``cache``, when given, is the past or shares
        its stores, as after :meth:`join`), and its layers took the call's tokens once the call
        had attended to them exactly."""
        return after

    def quantize_presents(
        self, caches: TurboQuantCache, presents: TurboQuantCache, past_len: int
    ) -> TurboQuantCache:
        """Positions past_len.. of an exact past (``presents``, kept as it is) into ``caches``."""
        for index, layer in enumerate(presents.layers):
            caches.update(layer.keys[:, :, past_len:], layer.values[:, :, past_len:], index)
        return caches

    def join(self, pasts: Sequence[TurboQuantCache]) -> TurboQuantCache:
        return TurboQuantCache.concatenate(pasts)

    def copy_past(self, past: TurboQuantCache) -> TurboQuantCache:
        return past.copy()

    def past_nbytes(self, past: TurboQuantCache) -> int:
        return past.nbytes
