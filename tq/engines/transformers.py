"""The decode loop through Hugging Face transformers: the ``transformers`` engine of the sweep.

:class:`TransformersRunner` implements :class:`tq.engines.onnx.DecodeRunner` with a model loaded from a
local checkpoint (:class:`~tq.models.checkpoint.Checkpoint`) on the CPU or a CUDA GPU, in float32,
bfloat16 or float16, and :class:`~tq.engines.transformers_cache.TurboQuantCache` as the past: an
exact run keeps every layer exact (fp32 keys and values), a quantized one uses the cache
setting. The protocols are those of the ONNX Runtime engine (:class:`tq.engines.onnx.RealModelRunner`):
a call's tokens attend to their own exact keys and values and to the earlier tokens'
reconstruction, then enter the cache. The model attends with SDPA over the reconstruction (the
cache's ``reconstruct`` path); the quantized store lives in host memory, so on a GPU each call
copies the reconstruction it attends to onto the device.

One difference from the ONNX engine: a transformers cache grows with every call, so the tokens of
:meth:`TransformersRunner.extend` always enter its past (quantized when the past is a quantized
cache), where the ONNX engine keeps them exact unless a cache is given.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import numpy as np
import torch

from tq.cache.kvcache import EXACT, CacheConfig
from tq.engines.onnx import DecodeRunner
from tq.engines.source import DTYPES, setting_problem
from tq.engines.transformers_cache import TurboQuantCache
from tq.models.checkpoint import Checkpoint, CheckpointError

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}  # tq.engines.DTYPES -> torch


def check_device(device: str) -> None:
    """Raise RuntimeError if ``device`` is ``cuda`` and torch sees no CUDA GPU here."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device cuda was asked for, but torch sees no CUDA GPU on {socket.gethostname()} "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})"
        )


class TransformersRunner(DecodeRunner):
    """Greedy decoding and teacher forcing of a Hugging Face checkpoint with tq's caches.

    Args:
        checkpoint: the model's checkpoint directory.
        device: ``cpu`` or ``cuda`` (the first GPU).
        dtype: the weights' and activations' type: ``float32``, ``bfloat16`` or ``float16``.
        threads: torch's intra-op threads (default: torch's choice).

    Raises:
        ValueError: an unknown device or dtype.
        RuntimeError: ``cuda`` on a machine without a CUDA GPU.
        CheckpointError: transformers cannot load the checkpoint.
    """

    def __init__(
        self, checkpoint: Checkpoint, device: str = "cpu", dtype: str = "float32", threads: int | None = None
    ) -> None:
        from transformers import AutoModelForCausalLM

        problem = setting_problem(device=device, dtype=dtype)
        if problem is not None:
            raise ValueError(problem)
        check_device(device)
        if threads is not None:
            torch.set_num_threads(threads)
        self.files, self.name = checkpoint, checkpoint.name
        self.device = torch.device(device)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                checkpoint.path, dtype=TORCH_DTYPES[dtype], attn_implementation="sdpa"
            )
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{checkpoint.path}: transformers cannot load it ({error})") from None
        self.model = model.to(self.device).eval()

    def new_cache(
        self, config: CacheConfig, layer_configs: dict[int, CacheConfig] | None = None
    ) -> TurboQuantCache:
        """An empty :class:`TurboQuantCache` (with its float32 reconstruction) for this model."""
        return TurboQuantCache(
            self.model.config, config, layer_configs=layer_configs, keep_reconstruction=True
        )

    def _call(self, input_ids: Sequence[int] | np.ndarray, past: TurboQuantCache) -> np.ndarray:
        """One forward call of [s] or [batch, s] tokens after ``past`` (which takes them):
        logits float32 [s, vocab] or [batch, s, vocab]."""
        ids = np.asarray(input_ids, dtype=np.int64)
        single = ids.ndim == 1
        ids = ids[None, :] if single else ids
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [s] or [batch, s] with s >= 1, got shape {ids.shape}")
        with torch.inference_mode():
            logits = self.model(
                input_ids=torch.from_numpy(ids).to(self.device), past_key_values=past, use_cache=True
            ).logits
        out = logits.to(torch.float32).cpu().numpy()
        return out[0] if single else out

    def prefill(
        self, prompt_ids: Sequence[int] | np.ndarray, cache: TurboQuantCache | None = None
    ) -> tuple[np.ndarray, TurboQuantCache]:
        """The prompt in one call; its past is ``cache`` (quantized as the tokens enter it after
        the call), or an exact cache."""
        past = cache if cache is not None else self.new_cache(EXACT)
        return self._call(prompt_ids, past), past

    def extend(
        self, input_ids: Sequence[int] | np.ndarray, past: TurboQuantCache, cache: object = None
    ) -> tuple[np.ndarray, TurboQuantCache]:
        """Tokens after ``past``, which takes them (``cache``, when given, is ``past`` or shares its
        stores, as after :meth:`join`)."""
        return self._call(input_ids, past), past

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
