"""tq: TurboQuant KV-cache quantization, measured on real models.

The names below are imported on first use (PEP 562), so that ``import tq`` loads no module of
the package: a pipeline job's code is then what its script imports, and nothing else
(:mod:`tq.pipeline.sources`).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "BatchFormatError": "tq.quant.batch",
    "BatchQuantizedMSE": "tq.quant.batch",
    "BatchQuantizedProd": "tq.quant.batch",
    "CacheConfig": "tq.cache.kvcache",
    "Codebook": "tq.core.codebook",
    "KvTrace": "tq.data.trace",
    "MultiHeadKVCache": "tq.cache.kvcache",
    "QuantizedKVCache": "tq.cache.kvcache",
    "Rotation": "tq.core.rotation",
    "TurboQuantMSE": "tq.quant.turboquant",
    "TurboQuantProd": "tq.quant.turboquant",
    "lloyd_max_codebook": "tq.core.codebook",
    "make_rotation": "tq.core.rotation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
