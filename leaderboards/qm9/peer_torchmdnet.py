"""TorchMD-NET's equivariant transformer (Thölke & De Fabritiis, ICLR 2022) as a peer model.

The representation network is TorchMD-NET's own ``TorchMD_ET`` from the PyPI package
``torchmd-net`` (3.x), with the hyperparameters of its ``examples/ET-QM9.yaml`` (256 channels,
8 layers, 64 exp-norm RBFs, 8 heads, cutoff 5 Å, neighbour embedding, distance influence on keys
and values). Two things differ from a stock install, both documented in leaderboards/README.md:

* Neighbour search: torchmd-net 3.x computes neighbour pairs with NVIDIA Warp kernels, and the
  ``warp-lang`` wheel (149 MB) cannot be carried to our GPU machine. We replace the model's
  ``distance`` module with an exact pure-torch equivalent (all pairs within the cutoff inside
  each molecule, self-loops included as ET expects). QM9 molecules have at most 29 atoms, so
  ET's 64-neighbour cap never binds and the graph is identical.
* Output head: ET's ``Scalar`` head (MLP hidden -> hidden/2 -> 1, sum over atoms) widened to T
  outputs so that one network can learn several targets, like ours.

The peer is trained by our :class:`~equiformer.tasks.property.PropertyTask` on the same split,
normalisation, loss, optimiser schedule and time budget as Equiformer. Use as a model name
``leaderboards.qm9.peer_torchmdnet:TorchMDNetET`` (``equiformer.models.build_model`` resolves
``module:Class`` names).
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
from torch import nn


def _import_torchmd_et():
    """Import ``TorchMD_ET`` without importing Warp (only its neighbour kernel needs it)."""
    if "torchmdnet.extensions.ops" not in sys.modules:
        stub = types.ModuleType("torchmdnet.extensions.ops")

        def get_neighbor_pairs_kernel(*args: Any, **kwargs: Any):
            raise RuntimeError("Warp neighbour kernel replaced by PairwiseDistanceWithLoops")

        stub.get_neighbor_pairs_kernel = get_neighbor_pairs_kernel
        sys.modules["torchmdnet.extensions.ops"] = stub
    from torchmdnet.models.torchmd_et import TorchMD_ET

    return TorchMD_ET


class PairwiseDistanceWithLoops(nn.Module):
    """Drop-in for TorchMD-NET's ``OptimizedDistance(loop=True, return_vecs=True)``.

    Returns ``edge_index`` [2,E] (row 0 = i, row 1 = j, both directions and i == j self-loops),
    ``edge_weight`` [E] distances in Å (0 for self-loops) and ``edge_vec`` [E,3] = pos[i] - pos[j],
    which is TorchMD-NET's convention.
    """

    def __init__(self, cutoff: float) -> None:
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, pos: torch.Tensor, batch: torch.Tensor, box: torch.Tensor | None = None):
        from equiformer.graph import radius_graph

        edge_index = radius_graph(pos, self.cutoff, batch=batch)  # row 0 = source j, row 1 = target i
        j, i = edge_index[0], edge_index[1]
        loops = torch.arange(pos.shape[0], device=pos.device)
        i = torch.cat([i, loops])
        j = torch.cat([j, loops])
        edge_vec = pos[i] - pos[j]
        edge_weight = torch.where(
            i == j, torch.zeros_like(edge_vec[:, 0]), edge_vec.norm(dim=-1)
        )
        return torch.stack([i, j]), edge_weight, edge_vec


class TorchMDNetET(nn.Module):
    """TorchMD-NET ET representation + a T-output scalar head; ``forward(data) -> {"y": [B, T]}``."""

    def __init__(
        self,
        num_targets: int = 1,
        hidden_channels: int = 256,
        num_layers: int = 8,
        num_rbf: int = 64,
        num_heads: int = 8,
        cutoff: float = 5.0,
        max_z: int = 100,
    ) -> None:
        super().__init__()
        self.config = dict(
            num_targets=num_targets, hidden_channels=hidden_channels, num_layers=num_layers,
            num_rbf=num_rbf, num_heads=num_heads, cutoff=cutoff, max_z=max_z,
        )
        TorchMD_ET = _import_torchmd_et()
        self.representation = TorchMD_ET(
            hidden_channels=hidden_channels, num_layers=num_layers, num_rbf=num_rbf,
            rbf_type="expnorm", trainable_rbf=False, activation="silu", attn_activation="silu",
            neighbor_embedding=True, num_heads=num_heads, distance_influence="both",
            cutoff_lower=0.0, cutoff_upper=cutoff, max_z=max_z, max_num_neighbors=64,
        )
        self.representation.distance = PairwiseDistanceWithLoops(cutoff)
        self.head = nn.Sequential(
            nn.Linear(hidden_channels, hidden_channels // 2), nn.SiLU(), nn.Linear(hidden_channels // 2, num_targets)
        )

    def forward(self, data) -> dict[str, torch.Tensor]:
        batch = data.batch if getattr(data, "batch", None) is not None else torch.zeros_like(data.z)
        x, _vec, _z, _pos, _batch = self.representation(data.z, data.pos, batch)
        per_atom = self.head(x)
        num_graphs = int(data.num_graphs) if hasattr(data, "num_graphs") else 1
        y = torch.zeros(num_graphs, per_atom.shape[1], dtype=per_atom.dtype, device=per_atom.device)
        return {"y": y.index_add_(0, batch, per_atom)}
