"""Tiny e3nn reference models used only by the tests of ``equiformer.testing``.

:class:`ReferenceModel` is E(3)-equivariant by construction (979 parameters, half of them the
element embedding): neighbour graph within ``cutoff`` from ``equiformer.graph.build_edges``
(periodic images included), spherical harmonics of the
edge vectors, one e3nn ``FullyConnectedTensorProduct`` message weighted by a smooth radial
MLP, a quadratic invariant of the node features, and these outputs:

=================  =========  ===========  ======================================
key                shape      irreps       meaning
=================  =========  ===========  ======================================
``energy``         [B]        0e           sum of per-atom energies
``forces``         [N, 3]     1o           ``-dE/dpos`` by autograd
``dipole``         [B, 3]     1o           sum of per-atom vectors
``quadrupole``     [B, 5]     2e           sum of per-atom 2e features
``atom_scalars``   [N, 2]     2x0e         per-atom invariants
``atom_features``  [N, 20]    4x0e+2x1o+2x2e  the hidden node features
=================  =========  ===========  ======================================

``flaw`` builds deliberately broken variants that the harness must catch:

``"raw_x"``          the raw x coordinate is a node feature (not rotation invariant)
``"pseudovector"``   ``dipole`` is a cross product (1e) although declared 1o (wrong parity)
``"absolute_pos"``   ``|pos|`` is a node feature (rotation- but not translation-invariant)
``"atom_order"``     the atom's index is a node feature (not permutation equivariant)
``"force_sign"``     ``forces = +dE/dpos``
``"force_scale"``    ``forces = -0.5 dE/dpos``
``"no_pbc"``         periodic images ignored (crystals treated as molecules)
``"hard_cutoff"``    no smooth envelope: the energy jumps when a pair crosses the cutoff
"""

from __future__ import annotations

import copy
import math

import torch
from e3nn import o3
from e3nn.nn import FullyConnectedNet
from torch_geometric.data import Data

from equiformer.graph import build_edges, radius_graph

FLAWS = (
    "raw_x",
    "pseudovector",
    "absolute_pos",
    "atom_order",
    "force_sign",
    "force_scale",
    "no_pbc",
    "hard_cutoff",
)

#: irreps of every output of :class:`ReferenceModel`, as the harness wants them
OUTPUT_IRREPS = {
    "energy": "0e",
    "forces": "1o",
    "dipole": "1o",
    "quadrupole": "2e",
    "atom_scalars": "2x0e",
    "atom_features": "4x0e+2x1o+2x2e",
}


def _molecular_edges(data: Data, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs within ``cutoff`` inside each graph, ignoring cell and pbc (the ``no_pbc`` flaw)."""
    edge_index = radius_graph(data.pos.detach(), cutoff, batch=data.batch)
    j, i = edge_index
    return edge_index, data.pos[j] - data.pos[i]


class ReferenceModel(torch.nn.Module):
    """A small E(3)-equivariant message-passing model (see the module docstring).

    Args:
        cutoff: neighbour cutoff in Å.
        num_basis: Gaussian radial basis functions.
        seed: seed of the weight initialisation (same seed, same model).
        flaw: None, or one of :data:`FLAWS` to build a deliberately broken model.
    """

    hidden_irreps = o3.Irreps("4x0e+2x1o+2x2e")
    sh_irreps = o3.Irreps("0e+1o+2e")

    def __init__(self, cutoff: float = 4.0, num_basis: int = 6, seed: int = 0, flaw: str | None = None):
        super().__init__()
        if flaw is not None and flaw not in FLAWS:
            raise ValueError(f"unknown flaw {flaw!r}; choose from {FLAWS}")
        self.config = {"cutoff": cutoff, "num_basis": num_basis, "seed": seed, "flaw": flaw}
        self.cutoff = float(cutoff)
        self.flaw = flaw
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.embed = torch.nn.Embedding(119, 4)
            self.tp = o3.FullyConnectedTensorProduct(
                "4x0e", self.sh_irreps, self.hidden_irreps, shared_weights=False, internal_weights=False
            )
            self.radial = FullyConnectedNet([num_basis, 8, self.tp.weight_numel], torch.nn.functional.silu)
            self.square = o3.FullyConnectedTensorProduct(self.hidden_irreps, self.hidden_irreps, "4x0e")
            self.energy_head = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.SiLU(), torch.nn.Linear(8, 1))
            self.atom_head = torch.nn.Linear(8, 2)
            self.vector_head = o3.Linear(self.hidden_irreps, "1o")
            self.quad_head = o3.Linear(self.hidden_irreps, "2e")
        self.register_buffer("centers", torch.linspace(0.0, self.cutoff, num_basis))

    def _edges(self, data: Data) -> tuple[torch.Tensor, torch.Tensor]:
        if self.flaw == "no_pbc":
            return _molecular_edges(data, self.cutoff)
        return build_edges(data, self.cutoff)

    def forward(self, data: Data) -> dict[str, torch.Tensor]:
        pos = data.pos
        if not pos.requires_grad:
            pos = pos.detach().requires_grad_(True)
        data = copy.copy(data)
        data.pos = pos
        n = pos.shape[0]
        batch = data.batch if data.batch is not None else torch.zeros(n, dtype=torch.long, device=pos.device)
        num_graphs = int(batch.max()) + 1 if n else 0

        with torch.enable_grad():
            edge_index, edge_vec = self._edges(data)
            src, dst = edge_index[0], edge_index[1]
            length = edge_vec.norm(dim=-1)
            width = self.cutoff / (len(self.centers) - 1)
            basis = torch.exp(-(((length[:, None] - self.centers) / width) ** 2))
            if self.flaw == "hard_cutoff":
                envelope = torch.ones_like(length)
            else:
                envelope = 0.5 * (torch.cos(math.pi * length / self.cutoff) + 1.0)
            weight = self.radial(basis) * envelope[:, None]

            h0 = self.embed(data.z)
            if self.flaw == "raw_x":
                h0 = h0 + pos[:, :1]
            elif self.flaw == "absolute_pos":
                h0 = h0 + 0.3 * pos.norm(dim=-1, keepdim=True)
            elif self.flaw == "atom_order":
                h0 = h0 + 0.3 * torch.arange(n, dtype=pos.dtype, device=pos.device)[:, None] / max(n, 1)

            sh = o3.spherical_harmonics(self.sh_irreps, edge_vec, normalize=True, normalization="component")
            messages = self.tp(h0[src], sh, weight)
            h = torch.zeros(n, self.hidden_irreps.dim, dtype=pos.dtype, device=pos.device)
            h = h.index_add(0, dst, messages) / 2.0

            scalars = torch.cat([h0, 4.0 * self.square(h, h)], dim=-1)  # [N, 8] invariants
            atom_energy = self.energy_head(scalars).squeeze(-1)
            energy = torch.zeros(num_graphs, dtype=pos.dtype, device=pos.device).index_add(0, batch, atom_energy)
            grad = torch.autograd.grad(energy.sum(), pos, create_graph=self.training)[0]

        if self.flaw == "force_sign":
            forces = grad
        elif self.flaw == "force_scale":
            forces = -0.5 * grad
        else:
            forces = -grad

        if self.flaw == "pseudovector":
            v = h[:, 4:10].view(n, 2, 3)  # the two 1o channels (e3nn order: mul x dim)
            atom_vec = torch.linalg.cross(v[:, 0], v[:, 1])
        else:
            atom_vec = self.vector_head(h)
        dipole = torch.zeros(num_graphs, 3, dtype=pos.dtype, device=pos.device).index_add(0, batch, atom_vec)
        quad = torch.zeros(num_graphs, 5, dtype=pos.dtype, device=pos.device).index_add(0, batch, self.quad_head(h))
        return {
            "energy": energy,
            "forces": forces,
            "dipole": dipole,
            "quadrupole": quad,
            "atom_scalars": self.atom_head(scalars),
            "atom_features": h,
        }
