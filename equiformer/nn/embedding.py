"""Initial node features: atom-type embedding and Equiformer's edge-degree embedding."""

from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import Tensor, nn

from equiformer.o3.irreps import check_canonical, num_even_scalars

from .scatter import segment_sum
from .tensor_product import EquivariantLinear, RadialTensorProduct

__all__ = ["AtomEmbedding", "EdgeDegreeEmbedding"]


class AtomEmbedding(nn.Module):
    """Learned vector per atomic number in the ``0e`` channels; l > 0 channels start at zero.

    Equivalent to Equiformer's one-hot -> linear, for any element up to ``num_atom_types - 1``.

    Args:
        irreps_out: canonical node irreps (must contain ``0e``).
        num_atom_types: embedding rows; atomic numbers must lie in ``[0, num_atom_types)``.
    """

    def __init__(self, irreps_out: str | o3.Irreps, num_atom_types: int = 119) -> None:
        super().__init__()
        self.irreps_out = check_canonical(irreps_out, "AtomEmbedding irreps_out")
        self.num_scalars = num_even_scalars(self.irreps_out)
        if self.num_scalars == 0:
            raise ValueError(f"AtomEmbedding: {self.irreps_out} has no 0e channels to embed atom types in")
        self.num_atom_types = int(num_atom_types)
        self.num_rest = self.irreps_out.dim - self.num_scalars
        self.embedding = nn.Embedding(self.num_atom_types, self.num_scalars)

    def forward(self, z: Tensor) -> Tensor:
        """z [N] long atomic numbers -> [N, irreps_out.dim]."""
        if z.device.type == "cpu" and z.numel() and (int(z.min()) < 0 or int(z.max()) >= self.num_atom_types):
            raise ValueError(
                f"AtomEmbedding: atomic numbers must lie in [0, {self.num_atom_types}), got "
                f"{int(z.min())}..{int(z.max())}"
            )
        scalars = self.embedding(z)
        rest = scalars.new_zeros(z.shape[0], self.num_rest)
        return torch.cat([scalars, rest], dim=1)


class EdgeDegreeEmbedding(nn.Module):
    """Equiformer's edge-degree embedding: a sum over incoming edges of a radial x harmonic feature.

    ``h_i = sum_j w_ij Linear(DTP(c, Y(r_ij); MLP(rbf(r_ij)))) / sqrt(avg_degree)`` with a learned constant
    scalar vector ``c`` and optional smooth-cutoff weights ``w_ij``. It seeds the l > 0 channels with
    geometry before the first attention block. (The paper feeds the full node irreps of a constant
    into the tensor product; only its ``0e`` part is non-zero, which is what is computed here.)

    Args:
        irreps_node: canonical node irreps (output).
        irreps_sh: irreps of the edge harmonics.
        radial_channels: ``[num_basis, hidden...]`` of the radial MLP.
        avg_degree: average number of incoming edges, normalises the sum.
        tp_backend: ``"fused"`` or ``"e3nn"`` (see :class:`DepthwiseTensorProduct`).
    """

    def __init__(
        self,
        irreps_node: str | o3.Irreps,
        irreps_sh: str | o3.Irreps,
        radial_channels: list[int],
        avg_degree: float,
        tp_backend: str = "fused",
    ) -> None:
        super().__init__()
        self.irreps_node = check_canonical(irreps_node, "EdgeDegreeEmbedding irreps_node")
        num_scalars = num_even_scalars(self.irreps_node)
        if num_scalars == 0:
            raise ValueError(f"EdgeDegreeEmbedding: {self.irreps_node} has no 0e channels")
        self.constant = nn.Parameter(torch.randn(num_scalars))
        self.tp = RadialTensorProduct(f"{num_scalars}x0e", irreps_sh, self.irreps_node, radial_channels, tp_backend)
        self.proj = EquivariantLinear(self.tp.irreps_out, self.irreps_node)
        self.avg_degree = float(avg_degree)

    def forward(
        self, edge_index: Tensor, edge_sh: Tensor, edge_scalars: Tensor, num_nodes: int, edge_weight: Tensor | None = None
    ) -> Tensor:
        """edge_index [2, E] (row 1 = target), edge_sh [E, S], edge_scalars [E, B], edge_weight [E] -> [N, irreps_node.dim]."""
        x = self.constant.expand(edge_sh.shape[0], -1)
        features = self.proj(self.tp(x, edge_sh, edge_scalars))
        if edge_weight is not None:
            features = features * edge_weight.unsqueeze(-1)
        return segment_sum(features, edge_index[1], num_nodes) / math.sqrt(self.avg_degree)
