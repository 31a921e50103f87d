"""tq: TurboQuant KV-cache quantization, measured on real models."""

from tq.batch import BatchFormatError, BatchQuantizedMSE, BatchQuantizedProd
from tq.codebook import Codebook, lloyd_max_codebook
from tq.kvcache import CacheConfig, MultiHeadKVCache, QuantizedKVCache
from tq.quantizers import TurboQuantMSE, TurboQuantProd
from tq.rotation import Rotation, make_rotation
from tq.trace import KvTrace

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
