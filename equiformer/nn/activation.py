"""Equivariant non-linearities: the SiLU/sigmoid gate and the smooth leaky ReLU of attention logits."""

from __future__ import annotations

import torch
from e3nn import o3
from torch import Tensor, nn

from equiformer.o3.irreps import check_canonical, irreps_to_gate

__all__ = ["Gate", "SmoothLeakyReLU"]


class Gate(nn.Module):
    """Gate activation producing ``irreps_out`` (canonical layout).

    Input layout ``[scalars | gates | gated]`` (``self.irreps_in``, canonical: one ``0e`` block): scalars ``0e`` -> SiLU; every
    other irrep (``0o`` and l > 0) is multiplied by the sigmoid of its own ``0e`` gate. Output layout
    ``[scalars | gated]`` equals ``irreps_out``.

    Args:
        irreps_out: canonical irreps of the output, e.g. ``"384x0e+192x1e+96x2e"``.
    """

    def __init__(self, irreps_out: str | o3.Irreps) -> None:
        super().__init__()
        self.irreps_out = check_canonical(irreps_out, "Gate irreps_out")
        scalars, gates, gated = irreps_to_gate(self.irreps_out)
        self.irreps_in = (scalars + gates + gated).simplify()  # canonical: gates join the 0e block
        if scalars + gated != self.irreps_out:  # canonical irreps always start with 0e
            raise ValueError(f"Gate: {self.irreps_out} must start with its 0e scalars")
        self.num_scalars = scalars.dim
        self.num_gates = gates.dim
        # gate of each component of the gated block
        index: list[int] = []
        for mul, ir in gated:
            for _ in range(mul):
                gate = index[-1] + 1 if index else 0
                index.extend([gate] * ir.dim)
        self.register_buffer("gate_index", torch.tensor(index, dtype=torch.long), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., irreps_in.dim] -> [..., irreps_out.dim]."""
        if self.num_gates == 0:
            return torch.nn.functional.silu(x)
        scalars, gates, gated = x.split([self.num_scalars, self.num_gates, x.shape[-1] - self.num_scalars - self.num_gates], -1)
        gated = gated * torch.sigmoid(gates).index_select(-1, self.gate_index)
        return torch.cat([torch.nn.functional.silu(scalars), gated], dim=-1)

    def extra_repr(self) -> str:
        return f"irreps_in={self.irreps_in}, irreps_out={self.irreps_out}"


class SmoothLeakyReLU(nn.Module):
    """``(1+a)/2 x + (1-a)/2 x (2 sigmoid(x) - 1)``: leaky ReLU with slope ``a`` for x << 0, smooth at 0."""

    def __init__(self, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.negative_slope = float(negative_slope)

    def forward(self, x: Tensor) -> Tensor:
        a = self.negative_slope
        return 0.5 * (1 + a) * x + 0.5 * (1 - a) * x * (2 * torch.sigmoid(x) - 1)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"
