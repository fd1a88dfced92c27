"""Equivariant feed-forward network: linear -> gate -> linear."""

from __future__ import annotations

from e3nn import o3
from torch import Tensor, nn

from equiformer.o3.irreps import check_canonical

from .activation import Gate
from .tensor_product import EquivariantLinear

__all__ = ["EquivariantFeedForward"]


class EquivariantFeedForward(nn.Module):
    """``Linear -> Gate -> Linear`` on node irreps (Equiformer's FeedForwardNetwork).

    Args:
        irreps_in: canonical input irreps.
        irreps_mid: canonical irreps after the gate, e.g. ``"384x0e+192x1e+96x2e"``.
        irreps_out: canonical output irreps.
    """

    def __init__(self, irreps_in: str | o3.Irreps, irreps_mid: str | o3.Irreps, irreps_out: str | o3.Irreps) -> None:
        super().__init__()
        self.irreps_in = check_canonical(irreps_in, "irreps_in")
        self.irreps_out = check_canonical(irreps_out, "irreps_out")
        self.gate = Gate(irreps_mid)
        self.lin1 = EquivariantLinear(self.irreps_in, self.gate.irreps_in)
        self.lin2 = EquivariantLinear(self.gate.irreps_out, self.irreps_out)

    def forward(self, x: Tensor) -> Tensor:
        """x [N, irreps_in.dim] -> [N, irreps_out.dim]."""
        return self.lin2(self.gate(self.lin1(x)))
