"""What one channel group of a device stream (:mod:`tq.cache.device_stream`) stores, and how.

A codec turns float32 rows [n, size] on the model's device into named tensors (its
:class:`Field` s, one entry per row, or per ``per`` rows), and those back into float32 rows:

- :class:`TurboQuantFields` ("mse", "prod"): :class:`tq.quant.torch_codec.TorchCodec`, torch on
  the device: packed codes, norms at the stream's ``norm_dtype``, and for Prod the QJL sign bits
  and the residual norms.
- :class:`BaselineFields` ("uniform", "rotated-uniform", "kivi", "fp8"): the baseline's own
  quantizer (:mod:`tq.quant.uniform`, :mod:`tq.quant.fp8`) encodes on the host (the rows that
  leave the exact window are copied there, their codes, zero points and scales back: the bytes
  of the host caches by construction); decoding is torch on the device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from tq.quant.fp8 import DECODE_TABLE, FP8Quantizer
from tq.quant.torch_codec import TorchCodec, TorchCodes, unpack_codes
from tq.quant.turboquant import TurboQuantMSE, TurboQuantProd
from tq.quant.uniform import UniformQuantizer

__all__ = ["BaselineFields", "Field", "TurboQuantFields", "codec_for"]


@dataclass(frozen=True)
class Field:
    """One stored tensor of a channel group: ``name``, an entry's trailing ``shape`` and
    ``dtype``, and ``per``, the rows (token positions) one entry covers."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    per: int = 1


class TurboQuantFields:
    """A TurboQuant group: encode and decode in torch on the device (bytes as tq's CPU kernels).

    Args:
        quantizer: the host's shared TurboQuantMSE or TurboQuantProd (normalize=True).
        device: the model's device.
        norm_dtype: "float32" or "float16": how the norms are stored.
    """

    flush = 1  # rows leave the exact window one by one
    norms = True  # renormalize applies

    def __init__(
        self, quantizer: TurboQuantMSE | TurboQuantProd, device: torch.device, norm_dtype: str
    ) -> None:
        self.codec, self.device = TorchCodec(quantizer, device), device
        self.prod = self.codec.prod
        norm = torch.float16 if norm_dtype == "float16" else torch.float32
        self.fields = [Field("codes", (self.codec.code_bytes,), torch.uint8), Field("norms", (), norm)]
        if self.prod:
            self.fields += [
                Field("signs", (self.codec.sign_bytes,), torch.uint8),
                Field("gammas", (), torch.float32),
            ]

    def encode(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Float32 rows [n, size] -> the stored tensors, one entry per row."""
        stored = self.codec.encode(rows)
        out = {"codes": stored.codes, "norms": stored.norms.to(self.fields[1].dtype)}
        if self.prod:
            out |= {"signs": stored.signs, "gammas": stored.gammas}
        return out

    def decode(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        """Stored tensors of n rows -> float32 rows [n, size] (norms as stored)."""
        return self.codec.decode(
            TorchCodes(fields["codes"], fields["norms"].float(), fields.get("signs"), fields.get("gammas"))
        )


class BaselineFields:
    """A baseline group: its quantizer encodes on the host; decoding is torch on the device.

    Args:
        quantizer: the stream's UniformQuantizer or FP8Quantizer.
        device: the model's device.
    """

    norms = False  # renormalize does not apply

    def __init__(self, quantizer: UniformQuantizer | FP8Quantizer, device: torch.device) -> None:
        self.quantizer, self.device = quantizer, device
        self.flush = quantizer.rows_per_group  # per-channel keys leave in whole groups of tokens
        self.fp8 = isinstance(quantizer, FP8Quantizer)
        dim = quantizer.dim
        if self.fp8:
            self.fields = [Field("codes", (dim,), torch.uint8)]
            if quantizer.scale is not None:
                self.fields.append(Field("scales", (), torch.float16))
            self.table = torch.from_numpy(DECODE_TABLE.copy()).to(device)
            return
        width = -(-dim * quantizer.bits // 8)
        if quantizer.axis == "token":
            params = Field("zeros", (len(quantizer.starts),), torch.float16)
            self.sizes = torch.from_numpy(quantizer.sizes).to(device)
        else:
            params = Field("zeros", (dim,), torch.float16, quantizer.group_size)
        self.fields = [
            Field("codes", (width,), torch.uint8),
            params,
            Field("scales", params.shape, torch.float16, params.per),
        ]
        rotation = quantizer.rotation
        self.rotation = (
            None if rotation is None else torch.from_numpy(rotation.matrix.astype(np.float64)).to(device)
        )

    def encode(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Float32 rows [n, size] -> the stored tensors (the quantizer's batch, on the device)."""
        batch = self.quantizer.quantize(rows.cpu().numpy())
        return {
            field.name: torch.from_numpy(getattr(batch, field.name)).to(self.device) for field in self.fields
        }

    def decode(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        """Stored tensors of n rows -> float32 rows [n, size], as the quantizer's dequantize."""
        if self.fp8:
            values = self.table[fields["codes"].long()]
            return values if "scales" not in fields else values * fields["scales"].float().unsqueeze(-1)
        quantizer = self.quantizer
        codes = unpack_codes(fields["codes"], quantizer.dim, quantizer.bits).float()
        zeros, scales = fields["zeros"].float(), fields["scales"].float()
        if quantizer.axis == "token":
            zeros, scales = (p.repeat_interleave(self.sizes, dim=-1) for p in (zeros, scales))
        else:
            zeros, scales = (p.repeat_interleave(quantizer.group_size, dim=0) for p in (zeros, scales))
        rows = zeros + codes * scales
        if self.rotation is not None:
            rows = (rows.double() @ self.rotation).float()
        return rows


@functools.cache
def codec_for(
    quantizer: TurboQuantMSE | TurboQuantProd | UniformQuantizer | FP8Quantizer,
    device: torch.device,
    norm_dtype: str,
) -> TurboQuantFields | BaselineFields:
    """One codec per shared quantizer, device and norm dtype."""
    if isinstance(quantizer, (TurboQuantMSE, TurboQuantProd)):
        return TurboQuantFields(quantizer, device, norm_dtype)
    return BaselineFields(quantizer, device)
