"""Counting the bytes a TurboQuantCache moves between host and device: every way a tensor's data
reaches the host (``cpu``, ``numpy``, ``item``, ``tolist``, truth and number conversions) and a
host array becomes a tensor (``torch.from_numpy``), while the cache's ``update`` or ``attend``
runs.

    with HostTransfers() as moved:
        model(input_ids=token, past_key_values=cache, use_cache=True)
    moved.records, moved.nbytes

On a CPU device nothing is a copy (``numpy`` is a view there), but the calls are the ones that
would copy on a GPU, so a CPU run counts what a GPU run would move.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tq.engines.transformers_cache import TurboQuantLayer

__all__ = ["HostTransfers"]

_TENSOR_METHODS = ("cpu", "numpy", "item", "tolist", "__bool__", "__int__", "__float__", "__index__")
_CACHE_METHODS = ("update", "attend")


class HostTransfers:
    """A context that records (what, bytes) for every host-device crossing inside the cache's
    ``update`` and ``attend``; not thread-safe (it patches torch and the layer class)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, int]] = []
        self._inside = 0
        self._saved: list[tuple[Any, str, Any]] = []

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self.records)

    def _patch(self, owner: Any, name: str, wrapper: Callable) -> None:
        original = getattr(owner, name)
        self._saved.append((owner, name, original))
        setattr(owner, name, wrapper(original))

    def _counting(self, name: str, size: Callable[..., int]) -> Callable:
        def wrap(original: Callable) -> Callable:
            def counted(*args, **kwargs):
                if self._inside:
                    self.records.append((name, size(*args)))
                return original(*args, **kwargs)

            return counted

        return wrap

    def _scoped(self, original: Callable) -> Callable:
        def scoped(*args, **kwargs):
            self._inside += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._inside -= 1

        return scoped

    def __enter__(self) -> HostTransfers:
        def tensor_bytes(tensor: torch.Tensor, *_: Any) -> int:
            return tensor.numel() * tensor.element_size()

        for name in _TENSOR_METHODS:
            self._patch(torch.Tensor, name, self._counting(name, tensor_bytes))
        self._patch(torch, "from_numpy", self._counting("from_numpy", lambda array: array.nbytes))
        for name in _CACHE_METHODS:
            self._patch(TurboQuantLayer, name, self._scoped)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()
