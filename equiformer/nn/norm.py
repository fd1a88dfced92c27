"""Equivariant layer normalisation over irreps features."""

from __future__ import annotations

import torch
from e3nn import o3
from torch import Tensor, nn

from equiformer.o3.irreps import SCALAR, as_irreps

__all__ = ["EquivariantLayerNorm"]


class EquivariantLayerNorm(nn.Module):
    """Layer norm of one node's irreps features (Equiformer's ``EquivariantLayerNormV2``).

    For each block ``mul x ir`` of ``irreps``: ``0e`` blocks are centred over their channels; then the
    block is divided by the root of its mean square (over channels and the ``2l+1`` components,
    "component" normalisation) plus ``eps``, scaled by a learned weight per channel, and ``0e``
    blocks get a learned bias. For scalars this is the standard LayerNorm; for l > 0 it is an RMS norm
    per degree, which commutes with rotations. Fully vectorised (two small matmuls, no loop).

    Args:
        irreps: irreps of the features (any layout).
        eps: added to the mean square.
        affine: learn the per-channel weight and the scalar bias.
    """

    def __init__(self, irreps: str | o3.Irreps, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.irreps = as_irreps(irreps)
        self.eps = float(eps)
        self.affine = affine
        dim, num_blocks = self.irreps.dim, len(self.irreps)
        block_of_component, channel_of_component, is_scalar = [], [], []
        average = torch.zeros(dim, num_blocks, dtype=torch.get_default_dtype())
        start, channel = 0, 0
        for b, (mul, ir) in enumerate(self.irreps):
            average[start : start + mul * ir.dim, b] = 1.0 / (mul * ir.dim)
            block_of_component += [b] * (mul * ir.dim)
            channel_of_component += [channel + c for c in range(mul) for _ in range(ir.dim)]
            is_scalar += [ir == SCALAR] * (mul * ir.dim)
            start += mul * ir.dim
            channel += mul
        self.register_buffer("average", average, persistent=False)  # [D, blocks]
        self.register_buffer("block_of_component", torch.tensor(block_of_component, dtype=torch.long), persistent=False)
        self.register_buffer("channel_of_component", torch.tensor(channel_of_component, dtype=torch.long), persistent=False)
        self.register_buffer("scalar_mask", torch.tensor(is_scalar, dtype=torch.get_default_dtype()), persistent=False)
        scalar_index = [i for i, s in enumerate(is_scalar) if s]
        self.register_buffer("scalar_index", torch.tensor(scalar_index, dtype=torch.long), persistent=False)
        if affine:
            self.weight = nn.Parameter(torch.ones(self.irreps.num_irreps))
            self.bias = nn.Parameter(torch.zeros(len(scalar_index)))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        """x [N, irreps.dim] -> [N, irreps.dim]."""
        block_mean = x @ self.average  # [N, blocks]
        x = x - block_mean.index_select(-1, self.block_of_component) * self.scalar_mask
        mean_square = (x * x) @ self.average
        scale = torch.rsqrt(mean_square + self.eps).index_select(-1, self.block_of_component)
        if self.weight is not None:
            scale = scale * self.weight.index_select(0, self.channel_of_component)
        x = x * scale
        if self.bias is not None and self.bias.numel():
            x = x + torch.zeros_like(self.scalar_mask).index_copy(0, self.scalar_index, self.bias)
        return x

    def extra_repr(self) -> str:
        return f"{self.irreps}, eps={self.eps}, affine={self.affine}"
