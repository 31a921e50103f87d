"""Linear layers whose weights are prepacked for oneDNN: the transformers engine's float32 CPU
matrix products.

A decode step multiplies a few rows (one per sequence of the batch) by every weight matrix of
the model, so it is bound by reading the weights; oneDNN reads them in its own blocked layout
faster than the plain row-major product (a 576 x 1536 layer for 4 rows: 176 -> 59 us on 2
threads). ONNX Runtime prepacks its weights the same way. The results are float32 products in
another summation order (logits within a few 1e-6 of their scale).
"""

from __future__ import annotations

import torch

__all__ = ["PrepackedLinear", "prepack_linears"]


class PrepackedLinear(torch.nn.Module):
    """``torch.nn.Linear`` with its weight reordered into oneDNN's blocked layout (float32, CPU),
    multiplied by oneDNN's linear kernel on dense inputs (the op torch.compile's CPU backend uses).

    Args:
        linear: the layer to copy (its weight is copied, not shared: a tied weight stays as it
            is for the layer that shares it).
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.weight_packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] float32 -> [..., out_features]."""
        return torch.ops.mkldnn._linear_pointwise(x, self.weight_packed, self.bias, "none", [], "")


def prepack_linears(model: torch.nn.Module) -> int:
    """Replace every ``torch.nn.Linear`` of a float32 CPU model by a :class:`PrepackedLinear`, in
    place; returns how many were replaced (0 where oneDNN is not available)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32:
                setattr(module, name, PrepackedLinear(child))
                replaced += 1
    return replaced
