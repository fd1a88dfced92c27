"""CGCNN (Xie & Grossman, Phys. Rev. Lett. 120, 145301, 2018) as a peer crystal model.

Built from PyTorch Geometric's :class:`torch_geometric.nn.CGConv` (the paper's gated
convolution ``x_i' = x_i + sum_j sigmoid(z_ij W_f + b_f) * softplus(z_ij W_s + b_s)``,
``z_ij = [x_i, x_j, e_ij]``, batch-normalised sum) with the hyperparameters of the paper and
its reference code (``cgcnn/main.py`` defaults):

* crystal graph: every neighbour within 8 Å (periodic images included), at most the 12
  nearest per atom;
* edge features: Gaussian expansion of the distance, centres 0 to 8 Å every 0.2 Å (41),
  ``exp(-(d - mu)^2 / 0.2^2)``;
* 64 atom features, 3 convolution layers, mean pooling over atoms, one hidden layer of 128
  with softplus, a linear output of T targets.

Differences from the paper, documented in ``leaderboards/mp/README.md``:

* atoms are embedded by a learned ``nn.Embedding`` (atomic number -> 64) instead of the
  paper's fixed 92-dimensional one-hot property vector (``atom_init.json``) followed by a
  linear layer;
* PyG's ``CGConv`` batch-normalises the summed messages and adds the residual, without the
  paper's extra batch norm on each message and the softplus after the sum;
* training (optimiser, schedule, batch size) is our :class:`~equiformer.tasks.property.PropertyTask`
  shared with the other models (the reference code uses SGD, lr 0.01, batch 256).

Use as a model name ``leaderboards.mp.peer_cgcnn:CGCNN`` (``equiformer.models.build_model``
resolves ``module:Class`` names).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class GaussianDistance(nn.Module):
    """Distances [E] (Å) -> [E, K] Gaussians ``exp(-(d - mu_k)^2 / width^2)``, ``mu_k = dmin + k * step``."""

    def __init__(self, dmin: float = 0.0, dmax: float = 8.0, step: float = 0.2) -> None:
        super().__init__()
        num = int(round((dmax - dmin) / step)) + 1
        self.register_buffer("centers", torch.linspace(dmin, dmin + step * (num - 1), num), persistent=False)
        self.width = float(step)

    def forward(self, d: Tensor) -> Tensor:
        return torch.exp(-((d.unsqueeze(-1) - self.centers.to(d.dtype)) ** 2) / self.width**2)


class CGCNN(nn.Module):
    """CGCNN: ``forward(data) -> {"y": [B, T]}`` for a PyG Batch of contract crystals (or molecules).

    Args:
        num_targets: T outputs per structure.
        atom_features: width of the atom features (paper: 64).
        hidden: width of the hidden layer after pooling (paper: 128).
        num_conv: convolution layers (paper: 3).
        num_hidden_layers: hidden layers after pooling (paper: 1).
        cutoff: neighbour radius (Å, paper: 8).
        max_neighbors: nearest neighbours kept per atom (paper: 12).
        gauss_step: spacing and width of the distance Gaussians (Å, paper: 0.2).
        num_atom_types: size of the embedding table (atomic numbers 1..num_atom_types-1).
    """

    def __init__(
        self,
        num_targets: int = 1,
        atom_features: int = 64,
        hidden: int = 128,
        num_conv: int = 3,
        num_hidden_layers: int = 1,
        cutoff: float = 8.0,
        max_neighbors: int = 12,
        gauss_step: float = 0.2,
        num_atom_types: int = 119,
    ) -> None:
        super().__init__()
        from torch_geometric.nn import CGConv

        self.config: dict[str, Any] = dict(
            num_targets=num_targets, atom_features=atom_features, hidden=hidden, num_conv=num_conv,
            num_hidden_layers=num_hidden_layers, cutoff=cutoff, max_neighbors=max_neighbors,
            gauss_step=gauss_step, num_atom_types=num_atom_types,
        )
        self.cutoff, self.max_neighbors = float(cutoff), int(max_neighbors)
        self.embedding = nn.Embedding(int(num_atom_types), int(atom_features))
        self.distance = GaussianDistance(0.0, float(cutoff), float(gauss_step))
        edge_dim = int(self.distance.centers.numel())
        self.convs = nn.ModuleList(
            CGConv(int(atom_features), dim=edge_dim, aggr="add", batch_norm=True) for _ in range(int(num_conv))
        )
        layers: list[nn.Module] = [nn.Linear(int(atom_features), int(hidden)), nn.Softplus()]
        for _ in range(int(num_hidden_layers) - 1):
            layers += [nn.Linear(int(hidden), int(hidden)), nn.Softplus()]
        self.fc = nn.Sequential(*layers)
        self.out = nn.Linear(int(hidden), int(num_targets))

    def forward(self, data: Any) -> dict[str, Tensor]:
        from equiformer.graph import build_edges

        z = data.z
        if z.numel() and (int(z.min()) < 1 or int(z.max()) >= self.embedding.num_embeddings):
            raise ValueError(f"CGCNN: atomic numbers must lie in [1, {self.embedding.num_embeddings - 1}], "
                             f"got {int(z.min())}..{int(z.max())}")
        n = z.shape[0]
        batch = getattr(data, "batch", None)
        if batch is None:
            batch = torch.zeros(n, dtype=torch.long, device=z.device)
        num_graphs = int(getattr(data, "num_graphs", 0) or (int(batch.max()) + 1 if n else 1))
        edge_index, vec = build_edges(data, self.cutoff, max_num_neighbors=self.max_neighbors)
        edge_attr = self.distance(torch.linalg.vector_norm(vec, dim=-1)).to(data.pos.dtype)
        x = self.embedding(z).to(data.pos.dtype)
        for conv in self.convs:
            x = conv(x, edge_index, edge_attr)  # messages flow row 0 (neighbour j) -> row 1 (centre i)
        count = torch.zeros(num_graphs, dtype=x.dtype, device=x.device).index_add_(0, batch, torch.ones_like(x[:, 0]))
        pooled = torch.zeros(num_graphs, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, batch, x)
        pooled = pooled / count.clamp(min=1).unsqueeze(1)
        return {"y": self.out(self.fc(pooled))}
