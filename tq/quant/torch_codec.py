"""TurboQuant's encode and decode as batched torch operations on any torch device.

:class:`TorchCodec` wraps a :class:`~tq.quant.turboquant.TurboQuantMSE` or
:class:`~tq.quant.turboquant.TurboQuantProd` (normalize=True, as caches use them) and runs its
algorithm on tensors where they live: rows [..., dim] of any leading shape, all in one pass.

- rotation: a float64 matrix product rounded to float32 for an encode (Haar), a float32 one for
  a decode or a query; "hadamard" is a fast Walsh-Hadamard transform, butterfly by butterfly;
- codes: ``torch.bucketize`` against the codebook's edges (a value on an edge goes to the lower
  cell), packed into bytes with shifts (:func:`pack_codes`, :func:`unpack_codes`).

The bytes are tq's CPU packing (:mod:`tq.core.packing`, :mod:`tq.kernels.cpu`) bit for bit for the
same inputs and seed: the encode rounds the same float32 values in the same order as the CPU
kernel (see its docstring), so codes, norms, QJL signs and residual norms are equal on every
device. Decodes agree with the CPU kernel's to float32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tq.core.packing import code_bytes
from tq.kernels.cpu import qjl_projection
from tq.kernels.naive import qjl_scale
from tq.quant.turboquant import TurboQuantMSE, TurboQuantProd

__all__ = ["TorchCodec", "TorchCodes", "pack_codes", "unpack_codes"]


def pack_codes(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [..., d] (each < 2^bits) into uint8 [..., code_bytes(d, bits)], the
    layout of :mod:`tq.core.packing` (one little-endian bit stream per row)."""
    dim = indices.shape[-1]
    lead = indices.shape[:-1]
    indices = indices.to(torch.uint8)
    if 8 % bits == 0 and dim % (8 // bits) == 0:  # whole codes fill whole bytes
        per_byte = 8 // bits
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=indices.device)
        grouped = indices.reshape(*lead, dim // per_byte, per_byte) << shifts
        return grouped.sum(dim=-1, dtype=torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8, device=indices.device)
    stream = ((indices.unsqueeze(-1) >> shifts) & 1).reshape(*lead, dim * bits)
    padding = 8 * code_bytes(dim, bits) - dim * bits
    if padding:
        stream = torch.nn.functional.pad(stream, (0, padding))
    weights = torch.arange(8, dtype=torch.uint8, device=indices.device)
    return (stream.reshape(*lead, code_bytes(dim, bits), 8) << weights).sum(dim=-1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 [..., code_bytes(dim, bits)] -> int64 [..., dim]."""
    lead = packed.shape[:-1]
    mask = (1 << bits) - 1
    if 8 % bits == 0 and dim % (8 // bits) == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(-1) >> shifts) & mask).reshape(*lead, dim).long()
    weights = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> weights) & 1).reshape(*lead, 8 * packed.shape[-1])[..., : dim * bits]
    powers = 1 << torch.arange(bits, dtype=torch.int64, device=packed.device)
    return (stream.reshape(*lead, dim, bits).long() * powers).sum(dim=-1)


@dataclass(frozen=True)
class TorchCodes:
    """What an encode stores for rows [..., dim]: ``codes`` uint8 [..., code_bytes], ``norms``
    float32 [...]; for Prod also ``signs`` uint8 [..., ceil(dim / 8)] (QJL sign bits) and
    ``gammas`` float32 [...] (residual norms), else None."""

    codes: torch.Tensor
    norms: torch.Tensor
    signs: torch.Tensor | None = None
    gammas: torch.Tensor | None = None


class TorchCodec:
    """A TurboQuant quantizer's encode and decode on one torch device.

    Args:
        quantizer: a TurboQuantMSE or TurboQuantProd with ``normalize=True``.
        device: where the rows, codes and the codec's matrices live.

    Raises:
        ValueError: a quantizer without ``normalize``.
    """

    def __init__(self, quantizer: TurboQuantMSE | TurboQuantProd, device: torch.device | str) -> None:
        if not quantizer.normalize:
            raise ValueError("TorchCodec encodes vectors of any norm: the quantizer needs normalize=True")
        self.quantizer = quantizer
        self.device = device = torch.device(device)
        self.dim, self.prod = quantizer.dim, isinstance(quantizer, TurboQuantProd)
        self.bits = quantizer.codebook.bits  # per code (Prod: one less than the quantizer's width)
        self.code_bytes = code_bytes(self.dim, self.bits)
        self.sign_bytes = code_bytes(self.dim, 1) if self.prod else 0
        rotation = quantizer.rotation
        self.hadamard = rotation.kind == "hadamard"
        self.matrix = torch.from_numpy(rotation.matrix).to(device)  # Pi, float32 [d, d]
        self.encode_matrix = torch.from_numpy(rotation.matrix.T.astype(np.float64)).to(device)
        if self.hadamard:
            self.signs = torch.from_numpy(rotation.signs).to(device)
            self.scale = torch.tensor(np.float32(1 / math.sqrt(self.dim)), device=device)
        self.edges = torch.from_numpy(np.ascontiguousarray(quantizer.codebook.edges, np.float32)).to(device)
        self.centroids = torch.from_numpy(np.ascontiguousarray(quantizer.codebook.centroids, np.float32)).to(
            device
        )
        if self.prod:
            qjl = quantizer.qjl
            self.qjl = torch.from_numpy(qjl).to(device)  # S, float32 [d, d]
            projection = qjl_projection(rotation, qjl)  # the CPU kernel's S Pi^T, float32
            self.projection_t = torch.from_numpy(projection.T.astype(np.float64)).to(device)
            self.qjl_scale = qjl_scale(self.dim)

    def __repr__(self) -> str:
        return f"TorchCodec({self.quantizer!r}, device={str(self.device)!r})"

    def _hadamard(self, x: torch.Tensor, signs_in: torch.Tensor | None, factor: torch.Tensor) -> torch.Tensor:
        """factor * H (signs_in * x) over the last axis, H the Sylvester matrix, one butterfly stage
        at a time in the CPU kernel's order (the same float32 roundings)."""
        lead, dim = x.shape[:-1], self.dim
        values = x * signs_in if signs_in is not None else x
        half = 1
        while half < dim:
            pairs = values.reshape(*lead, dim // (2 * half), 2, half)
            first, second = pairs[..., 0, :], pairs[..., 1, :]
            values = torch.stack((first + second, first - second), dim=-2)
            half *= 2
        return values.reshape(*lead, dim) * factor

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """y = Pi x for float32 rows [..., dim] (queries): a float32 product."""
        if self.hadamard:
            return self._hadamard(x, self.signs, self.scale)
        return x @ self.matrix.T

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """x = Pi^T y for float32 rows [..., dim]."""
        if self.hadamard:
            return self._hadamard(y, None, self.scale * self.signs)
        return y @ self.matrix

    def _encode_rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Pi x for an encode: float64 product rounded to float32 (Haar), or the transform."""
        if self.hadamard:
            return self._hadamard(x, self.signs, self.scale)
        return (x.double() @ self.encode_matrix).float()

    def encode(self, x: torch.Tensor) -> TorchCodes:
        """Quantize float32 rows [..., dim] (finite; zero rows stay zero) -> :class:`TorchCodes`."""
        if x.dtype != torch.float32 or x.shape[-1] != self.dim:
            raise ValueError(f"rows must be float32 [..., {self.dim}], got {x.dtype} {list(x.shape)}")
        rotated = self._encode_rotate(x)
        norms64 = rotated.double().square().sum(dim=-1).sqrt()
        inverse = torch.where(norms64 > 0, 1.0 / torch.where(norms64 > 0, norms64, 1.0), 1.0).float()
        values = rotated * inverse.unsqueeze(-1)
        indices = torch.bucketize(values, self.edges)
        codes = pack_codes(indices, self.bits)
        if not self.prod:
            return TorchCodes(codes, norms64.float())
        residual = values - self.centroids[indices]
        gammas = residual.double().square().sum(dim=-1).sqrt().float()
        positive = (residual.double() @ self.projection_t).float() >= 0  # rounded, as on the CPU
        return TorchCodes(codes, norms64.float(), pack_codes(positive, 1), gammas)

    def rotated_values(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """c[idx] * scales in the rotated domain: codes uint8 [..., code_bytes], scales float32
        [...] -> float32 [..., dim] (the MSE part of Pi x~)."""
        return self.centroids[unpack_codes(codes, self.dim, self.bits)] * scales.unsqueeze(-1)

    def sign_values(self, signs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """weights * (+-1) of the QJL sign bits: uint8 [..., sign_bytes], float32 [...] -> [..., dim]."""
        positive = unpack_codes(signs, self.dim, 1)
        return (2.0 * positive - 1.0).float() * weights.unsqueeze(-1)

    def qjl_weights(self, gammas: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """sqrt(pi/2) / d * gamma * |x| per row: the weight of a row's QJL signs."""
        return self.qjl_scale * gammas * norms

    def decode(self, stored: TorchCodes, norms: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 rows [..., dim] rebuilt from ``stored`` (with ``norms`` instead of its own,
        e.g. rounded to float16)."""
        norms = stored.norms if norms is None else norms
        rows = self.unrotate(self.rotated_values(stored.codes, norms))
        if self.prod:
            weights = self.qjl_weights(stored.gammas, norms)
            rows = rows + self.sign_values(stored.signs, weights) @ self.qjl
        return rows
