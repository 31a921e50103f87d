"""tq: TurboQuant KV-cache quantization, measured on real models."""

from tq.cache.kvcache import CacheConfig, MultiHeadKVCache, QuantizedKVCache
from tq.core.codebook import Codebook, lloyd_max_codebook
from tq.core.rotation import Rotation, make_rotation
from tq.data.trace import KvTrace
from tq.quant.batch import BatchFormatError, BatchQuantizedMSE, BatchQuantizedProd
from tq.quant.turboquant import TurboQuantMSE, TurboQuantProd

__version__ = "0.1.0"

__all__ = [
    "BatchFormatError",
    "BatchQuantizedMSE",
    "BatchQuantizedProd",
    "CacheConfig",
    "Codebook",
    "KvTrace",
    "MultiHeadKVCache",
    "QuantizedKVCache",
    "Rotation",
    "TurboQuantMSE",
    "TurboQuantProd",
    "lloyd_max_codebook",
    "make_rotation",
]
