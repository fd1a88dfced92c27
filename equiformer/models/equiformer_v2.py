"""EquiformerV2 (Liao, Wood, Das & Smidt, "EquiformerV2: Improved Equivariant Transformer for Scaling to
Higher-Degree Representations", ICLR 2024), written from the paper.

Pipeline, for a PyG ``Data``/``Batch`` of molecules and/or crystals/slabs (edges from
:func:`equiformer.graph.build_edges`, periodic images included):

``x[:, l=0] = Embedding(z)`` + :class:`~equiformer.nn.eqv2_layers.EdgeDegreeEmbedding` ->
``num_layers`` x [``x + DropPath(SO2GraphAttention(LN(x)))``; ``x + DropPath(S2FeedForward(LN(x)))``] -> LN ->

* energy: ``S2FeedForward(C -> 1)``, ``l = 0`` per atom, summed per graph and divided by ``avg_num_nodes``
  (``energy_reduce="sum"``, the paper's) or averaged (``"mean"``) -> ``"energy"`` [B];
* forces: ``direct_forces=True``: one more attention block with one output channel whose ``l = 1``
  coefficients are the force vector (e3nn's l = 1 basis is Cartesian x, y, z) -> ``"forces"`` [N, 3];
  ``direct_forces=False``: ``forces = -dE/dpos`` by autograd (conservative);
* ``num_targets = T > 0``: a third head gives graph targets ``"y"`` [B, T] (``target_reduce`` sum/mean).

Node features are coefficient arrays [N, (lmax+1)^2, C] in e3nn's real basis. Each edge is rotated
so that it points along +y (:mod:`equiformer.o3.wigner`), orders ``|m| <= mmax`` are kept, and SO(2)
convolutions replace SO(3) tensor products (eSCN). The paper's three additions are here:
attention re-normalisation (LayerNorm on the attention features), separable S2 activation, and
separable layer norm.

Equivariance: with ``activation="gate"`` every operation is exactly equivariant (float64 round-off).
The paper's S2 activation (``"s2"``) evaluates SiLU (and the FFN's grid MLP) on a finite grid of the
sphere, so the model is rotation-equivariant only up to the grid's aliasing error. Measured at random
initialisation on a Cu(111)+O slab (max |F(R x) - R F(x)| / max |F|, direct forces): 31M preset with
the paper's 18x18 grid 2.2% (energy 3e-4 relative), 153M 6%; the 31M model on a 36x36 grid 0.07%;
the small preset 4.5% / 0.7% / 0.26% on 8x8 / 12x12 / 14x14 grids. Translations, permutations and
periodic images are exact in both cases.

Deliberate differences from fairchem-core's implementation (which this code does not copy):

* the edge frame is deterministic (no random roll) and built in closed form, stable for edges along
  the pole; the Wigner-D matrices are differentiable, so ``direct_forces=False`` gives exact
  gradient forces;
* ``envelope="polynomial"`` (default) softly masks the attention softmax and the edge-degree sum so an
  atom crossing the cutoff enters smoothly (``envelope=None``: the paper's hard cutoff);
* the radial basis is the package's Gaussian basis (:mod:`equiformer.nn.radial`; learnable centres
  and widths) instead of fixed evenly spaced Gaussians;
* the S2 grid uses Gauss-Legendre latitudes and exact projections (``from_grid(to_grid(c)) = c``);
  fairchem also scales the ``l > mmax`` columns of both grid matrices by ``sqrt((2l+1)/(2 mmax+1))``,
  which is not done here (the same factor on the rotation back to the node frame is kept);
* ``max_neighbors`` keeps, by default, every neighbour tied (within ``max_neighbors_tolerance`` Å) with
  the k-th nearest, so symmetric shells are never split and equivariance survives the cap (fairchem
  issue #1068); ``max_neighbors_strict=True`` keeps exactly k (ties by edge order, not equivariant).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from equiformer.graph import build_edges
from equiformer.nn.weight_decay import no_weight_decay_names
from equiformer.nn.eqv2_layers import (
    ACTIVATIONS,
    EdgeDegreeEmbedding,
    GraphDropPath,
    S2FeedForward,
    SeparableLayerNorm,
    SO2GraphAttention,
    SO3Linear,
)
from equiformer.nn.radial import BesselRadialBasis, GaussianRadialBasis, PolynomialEnvelope, build_radial_basis
from equiformer.nn.scatter import segment_sum
from equiformer.nn.so2 import EdgeRotation
from equiformer.o3.wigner import WignerD

__all__ = ["PRESETS", "EquiformerV2", "EquiformerV2Block", "limit_neighbors"]

# fairchem-core's normalisers for OC20 (IS2RE 100k statistics), used by the paper's configs
_OC20_AVG_NUM_NODES = 77.81317
_OC20_AVG_DEGREE = 23.395238876342773

_OC20_31M: dict[str, Any] = {
    # configs/oc20/s2ef/all/equiformer_v2/equiformer_v2_N@8_L@4_M@2_31M.yml
    "num_layers": 8,
    "sphere_channels": 128,
    "attn_hidden_channels": 64,
    "num_heads": 8,
    "attn_alpha_channels": 64,
    "attn_value_channels": 16,
    "ffn_hidden_channels": 128,
    "lmax": 4,
    "mmax": 2,
    "grid_resolution": 18,
    "edge_channels": 128,
    "num_radial_basis": 600,
    "max_num_elements": 90,
    "cutoff": 12.0,
    "max_neighbors": 20,
    "alpha_drop": 0.1,
    "drop_path_rate": 0.1,
    "activation": "s2",
    "ffn_grid_mlp": True,
    "avg_num_nodes": _OC20_AVG_NUM_NODES,
    "avg_degree": _OC20_AVG_DEGREE,
}
# OC20 S2EF-2M, 12 blocks, lmax 6, mmax 2 (paper Table 1, "83M"; config ..._N@12_L@6_M@2.yml)
_OC20_83M: dict[str, Any] = {**_OC20_31M, "num_layers": 12, "lmax": 6, "mmax": 2, "drop_path_rate": 0.05}
# OC20 S2EF-All+MD, 20 blocks, lmax 6, mmax 3 (config ..._N@20_L@6_M@3_153M.yml)
_OC20_153M: dict[str, Any] = {**_OC20_31M, "num_layers": 20, "lmax": 6, "mmax": 3, "drop_path_rate": 0.1}
# CPU-sized model for tests and examples
_SMALL: dict[str, Any] = {
    "num_layers": 2,
    "sphere_channels": 32,
    "attn_hidden_channels": 32,
    "num_heads": 4,
    "attn_alpha_channels": 8,
    "attn_value_channels": 8,
    "ffn_hidden_channels": 64,
    "lmax": 3,
    "mmax": 2,
    "grid_resolution": 12,  # 2 (lmax+1) = 8 would give ~4% rotation error of the direct forces at init, 12: ~0.7%
    "edge_channels": 32,
    "num_radial_basis": 32,
    "max_num_elements": 119,
    "cutoff": 5.0,
    "max_neighbors": None,
    "alpha_drop": 0.0,
    "drop_path_rate": 0.0,
    "activation": "s2",
    "ffn_grid_mlp": True,
    # QM9 statistics at 5 Å (molecule-sized normalisers)
    "avg_num_nodes": 18.03065905448718,
    "avg_degree": 15.57930850982666,
}

#: named architectures (the paper's OC20 S2EF models + a CPU-sized one); explicit arguments override
PRESETS: dict[str, dict[str, Any]] = {"31M": _OC20_31M, "83M": _OC20_83M, "153M": _OC20_153M, "small": _SMALL}

#: without a preset: the 31M architecture on fairchem's class-default graph (5 Å, no neighbour cap)
_DEFAULTS: dict[str, Any] = {**_OC20_31M, "cutoff": 5.0, "max_neighbors": None}


def limit_neighbors(edge_index: Tensor, dist: Tensor, num_nodes: int, k: int, tolerance: float = 0.01) -> Tensor:
    """Mask [E] keeping, per centre i (row 1), the k nearest neighbours plus every neighbour whose
    distance is within ``tolerance`` (Å) of the k-th nearest (so tied shells are kept whole).

    Deterministic and independent of edge order, hence compatible with rotation and permutation
    equivariance (a strict cut at exactly k is not, fairchem issue #1068).
    """
    if k < 1:
        raise ValueError(f"max_neighbors must be >= 1, got {k}")
    num_edges = dist.shape[0]
    if num_edges == 0:
        return torch.ones(0, dtype=torch.bool, device=dist.device)
    d = dist.detach()
    i = edge_index[1]
    perm = torch.sort(d, stable=True).indices
    perm = perm[torch.sort(i[perm], stable=True).indices]  # grouped by centre, ascending distance
    counts = torch.bincount(i, minlength=num_nodes)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_edges, device=d.device) - first[i[perm]]
    kth = torch.full((num_nodes,), float("inf"), dtype=d.dtype, device=d.device)
    at_k = rank == k - 1
    kth[i[perm][at_k]] = d[perm][at_k]
    return d <= kth[i] + tolerance


class EquiformerV2Block(nn.Module):
    """Pre-norm block: ``x + DropPath(Attn(LN(x)))``, then ``x + DropPath(FFN(LN(x)))``."""

    def __init__(
        self,
        sphere_channels: int,
        attn_hidden_channels: int,
        num_heads: int,
        attn_alpha_channels: int,
        attn_value_channels: int,
        ffn_hidden_channels: int,
        lmax: int,
        mmax: int,
        num_basis: int,
        edge_channels: int,
        max_num_elements: int,
        use_atom_edge_embedding: bool,
        activation: str,
        use_attn_renorm: bool,
        ffn_grid_mlp: bool,
        alpha_drop: float,
        drop_path_rate: float,
        grid_resolution: int | tuple[int, int] | None,
    ) -> None:
        super().__init__()
        self.norm_1 = SeparableLayerNorm(lmax, sphere_channels)
        self.attention = SO2GraphAttention(
            sphere_channels,
            attn_hidden_channels,
            num_heads,
            attn_alpha_channels,
            attn_value_channels,
            sphere_channels,
            lmax,
            mmax,
            num_basis,
            edge_channels,
            max_num_elements,
            use_atom_edge_embedding=use_atom_edge_embedding,
            activation=activation,
            use_attn_renorm=use_attn_renorm,
            alpha_drop=alpha_drop,
            grid_resolution=grid_resolution,
        )
        self.norm_2 = SeparableLayerNorm(lmax, sphere_channels)
        self.ffn = S2FeedForward(
            sphere_channels, ffn_hidden_channels, sphere_channels, lmax, activation, ffn_grid_mlp, grid_resolution
        )
        self.drop_path = GraphDropPath(drop_path_rate)

    def forward(
        self,
        x: Tensor,
        z: Tensor,
        edge_index: Tensor,
        rbf: Tensor,
        rotation: EdgeRotation,
        edge_weight: Tensor | None,
        batch: Tensor,
        num_graphs: int,
    ) -> Tensor:
        """x [N, (lmax+1)^2, C] -> same shape."""
        update = self.attention(self.norm_1(x), z, edge_index, rbf, rotation, edge_weight)
        x = x + self.drop_path(update, batch, num_graphs)
        return x + self.drop_path(self.ffn(self.norm_2(x)), batch, num_graphs)


class EquiformerV2(nn.Module):
    """EquiformerV2 for energies, forces and graph-level targets (see module docstring).

    Every argument is JSON-serialisable and stored in ``self.config``;
    ``EquiformerV2(**model.config)`` rebuilds the same architecture. Arguments left ``None`` come from
    ``preset`` (without a preset: the 31M architecture with a 5 Å cutoff and no neighbour cap; the OC20
    presets use the paper's 12 Å cutoff with at most 20 neighbours).

    Args:
        preset: ``"31M"`` (OC20 S2EF All+MD: 8 blocks, lmax 4, mmax 2), ``"83M"`` (S2EF-2M: 12 blocks,
            lmax 6, mmax 2), ``"153M"`` (20 blocks, lmax 6, mmax 3), ``"small"`` (CPU: 2 blocks, lmax 3,
            mmax 2, 32 channels), or None.
        num_layers: transformer blocks.
        sphere_channels: C, channels per coefficient of the node features.
        attn_hidden_channels: channels between the two SO(2) convolutions of the attention.
        num_heads, attn_alpha_channels, attn_value_channels: heads, attention features and value
            channels per head.
        ffn_hidden_channels: hidden channels of the feed-forward networks.
        lmax: highest degree; mmax: highest order kept in the edge frame.
        grid_resolution: S2 grid size (int n for n x n, [n_lat, n_lon], or None for 2 (lmax+1)).
        max_num_elements: atomic numbers must be below this.
        edge_channels: hidden width of the radial MLPs and of the atom-type edge embeddings.
        num_radial_basis: Gaussians of the edge length.
        radial_basis: ``"gaussian"`` or ``"bessel"`` (:func:`equiformer.nn.radial.build_radial_basis`).
        use_atom_edge_embedding: feed source/target atom types to the radial MLPs.
        activation: ``"s2"`` (separable S2 activation, the paper's) or ``"gate"`` (exactly equivariant).
        ffn_grid_mlp: point-wise MLP on the S2 grid in the feed-forward networks (OC20 configs).
        use_attn_renorm: LayerNorm on the attention features (the paper's re-normalisation).
        alpha_drop: dropout of attention weights; drop_path_rate: stochastic depth (training only).
        cutoff: neighbour cutoff in Å.
        max_neighbors: cap on neighbours per atom, see :func:`limit_neighbors` (0: no cap; None: the
            preset's, 20 for the OC20 presets, none otherwise).
        max_neighbors_strict: keep exactly ``max_neighbors`` (breaks ties by edge order; not equivariant).
        max_neighbors_tolerance: Å; neighbours this close to the k-th distance count as tied.
        envelope: ``"polynomial"`` smooth cutoff or None (hard cutoff, the paper's).
        envelope_exponent: p of the polynomial envelope.
        avg_num_nodes: the summed energy (and summed targets) is divided by it.
        avg_degree: the edge-degree embedding is divided by it.
        regress_energy: energy head, output ``"energy"`` [B].
        energy_reduce: ``"sum"`` (divided by ``avg_num_nodes``) or ``"mean"`` (per-atom energy).
        regress_forces: output ``"forces"`` [N, 3].
        direct_forces: forces from an equivariant head (True) or ``-dE/dpos`` (False, needs the energy head).
        num_targets: T > 0 adds a head for ``"y"`` [B, T].
        target_reduce: ``"sum"`` (divided by ``avg_num_nodes``) or ``"mean"`` over the atoms of a graph.
    """

    def __init__(
        self,
        preset: str | None = None,
        num_layers: int | None = None,
        sphere_channels: int | None = None,
        attn_hidden_channels: int | None = None,
        num_heads: int | None = None,
        attn_alpha_channels: int | None = None,
        attn_value_channels: int | None = None,
        ffn_hidden_channels: int | None = None,
        lmax: int | None = None,
        mmax: int | None = None,
        grid_resolution: int | list[int] | None = None,
        max_num_elements: int | None = None,
        edge_channels: int | None = None,
        num_radial_basis: int | None = None,
        radial_basis: str = "gaussian",
        use_atom_edge_embedding: bool = True,
        activation: str | None = None,
        ffn_grid_mlp: bool | None = None,
        use_attn_renorm: bool = True,
        alpha_drop: float | None = None,
        drop_path_rate: float | None = None,
        cutoff: float | None = None,
        max_neighbors: int | None = None,
        max_neighbors_strict: bool = False,
        max_neighbors_tolerance: float = 0.01,
        envelope: str | None = "polynomial",
        envelope_exponent: int = 5,
        avg_num_nodes: float | None = None,
        avg_degree: float | None = None,
        regress_energy: bool = True,
        energy_reduce: str = "sum",
        regress_forces: bool = True,
        direct_forces: bool = True,
        num_targets: int = 0,
        target_reduce: str = "mean",
    ) -> None:
        super().__init__()
        given = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown EquiformerV2 preset {preset!r}; choose one of {sorted(PRESETS)}")
        base = PRESETS[preset] if preset is not None else _DEFAULTS
        cfg: dict[str, Any] = dict(given)
        for key, value in base.items():
            if cfg.get(key) is None:
                cfg[key] = value
        if isinstance(cfg["grid_resolution"], tuple):
            cfg["grid_resolution"] = list(cfg["grid_resolution"])
        self.config: dict[str, Any] = cfg
        self._check_config(cfg)

        self.lmax, self.mmax = int(cfg["lmax"]), min(int(cfg["mmax"]), int(cfg["lmax"]))
        self.sphere_channels = int(cfg["sphere_channels"])
        self.max_num_elements = int(cfg["max_num_elements"])
        self.cutoff = float(cfg["cutoff"])
        self.max_neighbors = int(cfg["max_neighbors"]) if cfg["max_neighbors"] else None  # None or 0: no cap
        self.max_neighbors_strict = bool(max_neighbors_strict)
        self.max_neighbors_tolerance = float(max_neighbors_tolerance)
        self.avg_num_nodes = float(cfg["avg_num_nodes"])
        self.regress_energy = bool(regress_energy)
        self.energy_reduce = energy_reduce
        self.regress_forces = bool(regress_forces)
        self.direct_forces = bool(direct_forces)
        self.num_targets = int(num_targets)
        self.target_reduce = target_reduce
        grid = cfg["grid_resolution"]
        grid = tuple(grid) if isinstance(grid, list) else grid
        num_basis = int(cfg["num_radial_basis"])
        edge_channels = int(cfg["edge_channels"])

        self.sphere_embedding = nn.Embedding(self.max_num_elements, self.sphere_channels)
        self.radial_basis = build_radial_basis(radial_basis, num_basis, self.cutoff)
        self.envelope = PolynomialEnvelope(self.cutoff, envelope_exponent) if envelope else None
        self.wigner = WignerD(self.lmax)
        self.edge_degree_embedding = EdgeDegreeEmbedding(
            self.sphere_channels,
            self.lmax,
            num_basis,
            edge_channels,
            self.max_num_elements,
            use_atom_edge_embedding,
            rescale_factor=float(cfg["avg_degree"]),
        )
        block_args = dict(
            sphere_channels=self.sphere_channels,
            attn_hidden_channels=int(cfg["attn_hidden_channels"]),
            num_heads=int(cfg["num_heads"]),
            attn_alpha_channels=int(cfg["attn_alpha_channels"]),
            attn_value_channels=int(cfg["attn_value_channels"]),
            ffn_hidden_channels=int(cfg["ffn_hidden_channels"]),
            lmax=self.lmax,
            mmax=self.mmax,
            num_basis=num_basis,
            edge_channels=edge_channels,
            max_num_elements=self.max_num_elements,
            use_atom_edge_embedding=bool(use_atom_edge_embedding),
            activation=cfg["activation"],
            use_attn_renorm=bool(use_attn_renorm),
            ffn_grid_mlp=bool(cfg["ffn_grid_mlp"]),
            alpha_drop=float(cfg["alpha_drop"]),
            drop_path_rate=float(cfg["drop_path_rate"]),
            grid_resolution=grid,
        )
        self.blocks = nn.ModuleList(EquiformerV2Block(**block_args) for _ in range(int(cfg["num_layers"])))
        self.norm = SeparableLayerNorm(self.lmax, self.sphere_channels)

        def scalar_head(out_channels: int) -> S2FeedForward:
            return S2FeedForward(
                self.sphere_channels,
                int(cfg["ffn_hidden_channels"]),
                out_channels,
                self.lmax,
                cfg["activation"],
                bool(cfg["ffn_grid_mlp"]),
                grid,
            )

        self.energy_head = scalar_head(1) if self.regress_energy else None
        self.target_head = scalar_head(self.num_targets) if self.num_targets > 0 else None
        self.force_head = None
        if self.regress_forces and self.direct_forces:
            self.force_head = SO2GraphAttention(
                self.sphere_channels,
                int(cfg["attn_hidden_channels"]),
                int(cfg["num_heads"]),
                int(cfg["attn_alpha_channels"]),
                int(cfg["attn_value_channels"]),
                1,
                self.lmax,
                self.mmax,
                num_basis,
                edge_channels,
                self.max_num_elements,
                use_atom_edge_embedding=bool(use_atom_edge_embedding),
                activation=cfg["activation"],
                use_attn_renorm=bool(use_attn_renorm),
                alpha_drop=0.0,
                grid_resolution=grid,
            )

    @staticmethod
    def _check_config(cfg: dict[str, Any]) -> None:
        if cfg["activation"] not in ACTIVATIONS:
            raise ValueError(f"unknown activation {cfg['activation']!r}; choose one of {ACTIVATIONS}")
        if cfg["envelope"] not in (None, "polynomial"):
            raise ValueError(f"unknown envelope {cfg['envelope']!r}; choose 'polynomial' or None")
        for key in ("energy_reduce", "target_reduce"):
            if cfg[key] not in ("sum", "mean"):
                raise ValueError(f"unknown {key} {cfg[key]!r}; choose 'sum' or 'mean'")
        if int(cfg["lmax"]) < 1 or int(cfg["mmax"]) < 0:
            raise ValueError(f"EquiformerV2 needs lmax >= 1 and mmax >= 0, got lmax={cfg['lmax']}, mmax={cfg['mmax']}")
        if int(cfg["num_layers"]) < 1:
            raise ValueError(f"num_layers must be >= 1, got {cfg['num_layers']}")
        if int(cfg["num_targets"]) < 0:
            raise ValueError(f"num_targets must be >= 0, got {cfg['num_targets']}")
        if cfg["regress_forces"] and not cfg["direct_forces"] and not cfg["regress_energy"]:
            raise ValueError("gradient forces (direct_forces=False) need the energy head (regress_energy=True)")
        if not (cfg["regress_energy"] or cfg["regress_forces"] or int(cfg["num_targets"]) > 0):
            raise ValueError("the model predicts nothing: enable regress_energy, regress_forces or num_targets")

    def no_weight_decay(self) -> set[str]:
        """Parameters trained without weight decay in the paper: norms, biases, the radial basis."""
        return no_weight_decay_names(self, (nn.LayerNorm, SeparableLayerNorm, GaussianRadialBasis, BesselRadialBasis), (nn.Linear, SO3Linear))

    # ------------------------------------------------------------------ graph
    def edges(self, data: Any) -> tuple[Tensor, Tensor]:
        """edge_index [2, E] (row 0 = source j, row 1 = target i) and vectors [E, 3] = pos_j (+ image) - pos_i."""
        strict = self.max_neighbors if (self.max_neighbors is not None and self.max_neighbors_strict) else None
        edge_index, edge_vec = build_edges(data, self.cutoff, max_num_neighbors=strict)
        if self.max_neighbors is not None and not self.max_neighbors_strict:
            dist = torch.linalg.vector_norm(edge_vec.detach(), dim=-1)
            keep = limit_neighbors(edge_index, dist, data.pos.shape[0], self.max_neighbors, self.max_neighbors_tolerance)
            edge_index, edge_vec = edge_index[:, keep], edge_vec[keep]
        return edge_index, edge_vec

    # ---------------------------------------------------------------- forward
    def embed(self, data: Any) -> dict[str, Any]:
        """Node features after the final norm and the edge data the heads reuse.

        Returns:
            dict with ``x`` [N, (lmax+1)^2, C], ``z``, ``batch`` [N], ``num_graphs``, ``edge_index``,
            ``rbf``, ``rotation`` (:class:`EdgeRotation`), ``edge_weight``.
        """
        for field in ("z", "pos"):
            if getattr(data, field, None) is None:
                raise ValueError(f"EquiformerV2: input has no {field!r} field (expected a PyG Data/Batch of the data contract)")
        z = data.z.long()
        if z.device.type == "cpu" and z.numel() and (int(z.min()) < 0 or int(z.max()) >= self.max_num_elements):
            raise ValueError(
                f"EquiformerV2: atomic numbers must lie in [0, {self.max_num_elements}) (max_num_elements), "
                f"got {int(z.min())}..{int(z.max())}"
            )
        num_nodes = z.shape[0]
        batch = getattr(data, "batch", None)
        if batch is None:
            batch, num_graphs = torch.zeros_like(z), 1
        else:
            num_graphs = int(data.num_graphs) if hasattr(data, "num_graphs") else int(batch.max()) + 1

        edge_index, edge_vec = self.edges(data)
        dist = torch.linalg.vector_norm(edge_vec, dim=-1)
        rbf = self.radial_basis(dist)
        edge_weight = self.envelope(dist) if self.envelope is not None else None
        rotation = EdgeRotation.from_edges(edge_vec, self.wigner, self.mmax)

        scalars = self.sphere_embedding(z)
        x = torch.cat([scalars.unsqueeze(1), scalars.new_zeros(num_nodes, (self.lmax + 1) ** 2 - 1, self.sphere_channels)], 1)
        x = x + self.edge_degree_embedding(z, edge_index, rbf, rotation, num_nodes, edge_weight)
        for block in self.blocks:
            x = block(x, z, edge_index, rbf, rotation, edge_weight, batch, num_graphs)
        return {
            "x": self.norm(x),
            "z": z,
            "batch": batch,
            "num_graphs": num_graphs,
            "edge_index": edge_index,
            "rbf": rbf,
            "rotation": rotation,
            "edge_weight": edge_weight,
        }

    def _reduce(self, per_atom: Tensor, batch: Tensor, num_graphs: int, how: str) -> Tensor:
        total = segment_sum(per_atom, batch, num_graphs)
        if how == "sum":
            return total / self.avg_num_nodes
        count = torch.bincount(batch, minlength=num_graphs).clamp_min(1).to(per_atom.dtype)
        return total / count.view((-1,) + (1,) * (per_atom.dim() - 1))

    def _heads(self, data: Any) -> dict[str, Tensor]:
        emb = self.embed(data)
        x, batch, num_graphs = emb["x"], emb["batch"], emb["num_graphs"]
        out: dict[str, Tensor] = {}
        if self.energy_head is not None:
            per_atom = self.energy_head(x)[:, 0, 0]
            out["energy"] = self._reduce(per_atom, batch, num_graphs, self.energy_reduce)
        if self.target_head is not None:
            out["y"] = self._reduce(self.target_head(x)[:, 0, :], batch, num_graphs, self.target_reduce)
        if self.force_head is not None:
            forces = self.force_head(x, emb["z"], emb["edge_index"], emb["rbf"], emb["rotation"], emb["edge_weight"])
            out["forces"] = forces[:, 1:4, 0]
        return out

    def forward(self, data: Any) -> dict[str, Tensor]:
        """data: PyG Data/Batch (z [N], pos [N, 3] Å, cell [B, 3, 3] Å, pbc [B, 3], batch [N]).

        Returns:
            ``"energy"`` [B] (eV, if ``regress_energy``), ``"forces"`` [N, 3] (eV/Å, if ``regress_forces``),
            ``"y"`` [B, T] (if ``num_targets``). Gradient forces keep a graph for training when
            ``self.training``.
        """
        if not (self.regress_forces and not self.direct_forces):
            return self._heads(data)
        create_graph = self.training
        with torch.enable_grad():
            pos = data.pos if data.pos.requires_grad else data.pos.detach().requires_grad_(True)
            data = copy.copy(data)  # shallow: the caller's object keeps its pos
            data.pos = pos
            out = self._heads(data)
            (grad,) = torch.autograd.grad(out["energy"].sum(), pos, create_graph=create_graph)
        out["forces"] = -grad
        if not create_graph:
            out = {k: v.detach() for k, v in out.items()}
        return out
