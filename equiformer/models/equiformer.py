"""Equiformer: equivariant graph attention transformer (Liao & Smidt, ICLR 2023).

Pipeline, for a PyG ``Data``/``Batch`` of molecules and/or crystals:

``z -> AtomEmbedding`` + ``EdgeDegreeEmbedding(Y(r_ij), rbf(|r_ij|))`` -> ``num_layers`` x
[``x + GraphAttention(LN(x))``; ``x + FFN(LN(x))``] -> LN -> scalar head per atom -> sum over
atoms / sqrt(avg_num_nodes) (or mean) -> ``y`` [B, T].

Edges come from :func:`equiformer.graph.build_edges` (periodic images included), so the same
model runs on crystals. The default configuration is the paper's QM9 model (``preset="qm9"``,
SE(3), 6 blocks, ``128x0e+64x1e+32x2e``, 4 heads of ``32x0e+16x1e+8x2e``, 128 Gaussians,
cutoff 5 Å, MLP attention with non-linear messages, attention dropout 0.2; ~3.5M parameters).

One deliberate addition to the paper: ``envelope="polynomial"`` softly masks the attention
softmax and the edge-degree sum with a smooth cutoff so that energies and forces are smooth
when atoms cross the cutoff (``envelope=None`` gives the paper's hard cutoff).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from e3nn import o3
from torch import Tensor, nn

from equiformer.graph import build_edges
from equiformer.nn.weight_decay import no_weight_decay_names
from equiformer.nn import (
    AtomEmbedding,
    EdgeDegreeEmbedding,
    EquivariantFeedForward,
    EquivariantGraphAttention,
    EquivariantLayerNorm,
    EquivariantLinear,
    GaussianRadialBasis,
    BesselRadialBasis,
    PolynomialEnvelope,
    build_radial_basis,
    segment_mean,
    segment_sum,
)
from equiformer.o3 import check_canonical, spherical_harmonics_irreps

__all__ = ["PRESETS", "Equiformer", "EquiformerBlock"]

_QM9 = {
    "num_layers": 6,
    "irreps_node": "128x0e+64x1e+32x2e",
    "irreps_head": "32x0e+16x1e+8x2e",
    "num_heads": 4,
    "irreps_mlp_mid": "384x0e+192x1e+96x2e",
    "irreps_feature": "512x0e",
    "lmax": 2,
    "parity": False,
    "cutoff": 5.0,
    "num_basis": 128,
    "radial_basis": "gaussian",
    "radial_hidden": [64, 64],
    "attention": "mlp",
    "nonlinear_message": True,
    "alpha_drop": 0.2,
    # QM9 statistics at cutoff 5 Å (the paper's normalisers)
    "avg_num_nodes": 18.03065905448718,
    "avg_degree": 15.57930850982666,
}
_QM9_E3 = {
    **_QM9,
    "irreps_node": "128x0e+32x0o+32x1e+32x1o+16x2e+16x2o",
    "irreps_head": "32x0e+8x0o+8x1e+8x1o+4x2e+4x2o",
    "irreps_mlp_mid": "384x0e+96x0o+96x1e+96x1o+48x2e+48x2o",
    "parity": True,
}
_SMALL = {
    **_QM9,
    "num_layers": 3,
    "irreps_node": "64x0e+16x1e+8x2e",
    "irreps_head": "16x0e+4x1e+2x2e",
    "irreps_mlp_mid": "192x0e+48x1e+24x2e",
    "irreps_feature": "128x0e",
    "num_basis": 32,
    "radial_hidden": [32, 32],
}
_SMALL_E3 = {
    **_SMALL,
    "irreps_node": "64x0e+8x0o+8x1e+8x1o+4x2e+4x2o",
    "irreps_head": "16x0e+2x0o+2x1e+2x1o+1x2e+1x2o",
    "irreps_mlp_mid": "192x0e+24x0o+24x1e+24x1o+12x2e+12x2o",
    "parity": True,
}
#: named architectures; explicit keyword arguments override a preset's entries
PRESETS: dict[str, dict[str, Any]] = {"qm9": _QM9, "qm9_e3": _QM9_E3, "small": _SMALL, "small_e3": _SMALL_E3}


class EquiformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + Attn(LN(x))`` then ``shortcut(x) + FFN(LN(x))``.

    Args:
        irreps_node: canonical node irreps (input).
        irreps_sh: edge harmonic irreps.
        irreps_head, num_heads, radial_channels, attention, nonlinear_message, alpha_drop,
        irreps_pre_attn, negative_slope, tp_backend: see :class:`equiformer.nn.EquivariantGraphAttention`.
        irreps_mlp_mid: irreps inside the feed-forward network.
        irreps_out: output irreps (default ``irreps_node``); a linear shortcut maps the residual.
    """

    def __init__(
        self,
        irreps_node: str | o3.Irreps,
        irreps_sh: str | o3.Irreps,
        irreps_head: str | o3.Irreps,
        num_heads: int,
        irreps_mlp_mid: str | o3.Irreps,
        radial_channels: list[int],
        irreps_out: str | o3.Irreps | None = None,
        attention: str = "mlp",
        nonlinear_message: bool = True,
        alpha_drop: float = 0.0,
        irreps_pre_attn: str | o3.Irreps | None = None,
        negative_slope: float = 0.2,
        tp_backend: str = "fused",
    ) -> None:
        super().__init__()
        self.irreps_node = check_canonical(irreps_node, "irreps_node")
        self.irreps_out = check_canonical(irreps_out if irreps_out is not None else irreps_node, "irreps_out")
        self.norm_attn = EquivariantLayerNorm(self.irreps_node)
        self.attn = EquivariantGraphAttention(
            self.irreps_node,
            irreps_sh,
            irreps_head,
            num_heads,
            radial_channels,
            irreps_pre_attn=irreps_pre_attn,
            attention=attention,
            nonlinear_message=nonlinear_message,
            alpha_drop=alpha_drop,
            negative_slope=negative_slope,
            tp_backend=tp_backend,
        )
        self.norm_ffn = EquivariantLayerNorm(self.irreps_node)
        self.ffn = EquivariantFeedForward(self.irreps_node, irreps_mlp_mid, self.irreps_out)
        self.shortcut = EquivariantLinear(self.irreps_node, self.irreps_out) if self.irreps_out != self.irreps_node else None

    def forward(
        self, x: Tensor, edge_index: Tensor, edge_sh: Tensor, edge_scalars: Tensor, edge_weight: Tensor | None = None
    ) -> Tensor:
        """x [N, irreps_node.dim] -> [N, irreps_out.dim]; edge arguments as for the attention."""
        x = x + self.attn(self.norm_attn(x), edge_index, edge_sh, edge_scalars, edge_weight)
        update = self.ffn(self.norm_ffn(x))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return x + update


class Equiformer(nn.Module):
    """Equiformer for graph-level targets (and energy + forces).

    Every argument is JSON-serialisable and stored in ``self.config``;
    ``equiformer.models.build_model("equiformer", **model.config)`` rebuilds the same architecture.
    Arguments left ``None`` come from ``preset``.

    Args:
        preset: ``"qm9"`` (paper, SE(3)), ``"qm9_e3"`` (paper's E(3) variant), ``"small"``,
            ``"small_e3"`` (CPU-sized: 3 blocks of ``64x0e+16x1e+8x2e``).
        num_targets: T, width of ``y``.
        num_layers: transformer blocks.
        irreps_node: canonical hidden node irreps.
        irreps_head: irreps of one attention head.
        num_heads: attention heads.
        irreps_mlp_mid: irreps inside the feed-forward networks.
        irreps_feature: scalar irreps output by the last block (``"512x0e"``), input of the head.
        lmax: maximum degree of the edge spherical harmonics.
        parity: E(3) (harmonics ``1x0e+1x1o+1x2e``, invariant under reflections) if True,
            SE(3) (``1x0e+1x1e+1x2e``, parity ignored) if False.
        cutoff: neighbour cutoff in Å.
        num_basis: radial basis functions.
        radial_basis: ``"gaussian"`` (learnable, the paper's) or ``"bessel"``.
        radial_hidden: hidden widths of the radial MLPs.
        attention: ``"mlp"`` (the paper's) or ``"dot_product"`` (its ablation).
        nonlinear_message: gate + second depth-wise TP on the values.
        alpha_drop: dropout on the attention weights (training only).
        avg_num_nodes: sum readout divides by its square root.
        avg_degree: edge-degree embedding divides by its square root.
        envelope: ``"polynomial"`` smooth cutoff (soft mask of the attention) or None (hard cutoff).
        envelope_exponent: p of the polynomial envelope.
        readout: ``"sum"`` (scaled by 1/sqrt(avg_num_nodes), the paper's) or ``"mean"``.
        num_atom_types: atomic numbers must be below this.
        target_mean, target_std: per-target (or one for all) de-normalisation ``y = y * std + mean``.
        predict_forces: also return ``energy`` = y[:, 0] [B] and ``forces`` = -dE/dpos [N, 3].
        irreps_pre_attn: irreps of the merged message (default ``irreps_node``).
        negative_slope: of the smooth leaky ReLU in MLP attention.
        tp_backend: depth-wise tensor products by ``"fused"`` kernels (default) or ``"e3nn"`` (the
            reference); same parameters and results, so a checkpoint loads into either.
    """

    def __init__(
        self,
        preset: str = "qm9",
        num_targets: int = 1,
        num_layers: int | None = None,
        irreps_node: str | None = None,
        irreps_head: str | None = None,
        num_heads: int | None = None,
        irreps_mlp_mid: str | None = None,
        irreps_feature: str | None = None,
        lmax: int | None = None,
        parity: bool | None = None,
        cutoff: float | None = None,
        num_basis: int | None = None,
        radial_basis: str | None = None,
        radial_hidden: list[int] | None = None,
        attention: str | None = None,
        nonlinear_message: bool | None = None,
        alpha_drop: float | None = None,
        avg_num_nodes: float | None = None,
        avg_degree: float | None = None,
        envelope: str | None = "polynomial",
        envelope_exponent: int = 5,
        readout: str = "sum",
        num_atom_types: int = 119,
        target_mean: float | list[float] | None = None,
        target_std: float | list[float] | None = None,
        predict_forces: bool = False,
        irreps_pre_attn: str | None = None,
        negative_slope: float = 0.2,
        tp_backend: str = "fused",
    ) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown Equiformer preset {preset!r}; choose one of {sorted(PRESETS)}")
        cfg: dict[str, Any] = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        for key, value in PRESETS[preset].items():
            if cfg.get(key) is None:
                cfg[key] = value
        cfg["radial_hidden"] = [int(c) for c in cfg["radial_hidden"]]
        self.config: dict[str, Any] = cfg
        if envelope not in (None, "polynomial"):
            raise ValueError(f"unknown envelope {envelope!r}; choose 'polynomial' or None")
        if readout not in ("sum", "mean"):
            raise ValueError(f"unknown readout {readout!r}; choose 'sum' or 'mean'")
        if int(num_targets) < 1:
            raise ValueError(f"num_targets must be >= 1, got {num_targets}")

        self.num_targets = int(num_targets)
        self.cutoff = float(cfg["cutoff"])
        self.predict_forces = bool(predict_forces)
        self.readout = readout
        self.avg_num_nodes = float(cfg["avg_num_nodes"])
        self.irreps_sh = spherical_harmonics_irreps(int(cfg["lmax"]), bool(cfg["parity"]))
        irreps_node = check_canonical(cfg["irreps_node"], "irreps_node")
        irreps_feature = check_canonical(cfg["irreps_feature"], "irreps_feature")
        if any(ir != o3.Irrep("0e") for _, ir in irreps_feature):
            raise ValueError(f"irreps_feature must be scalars (e.g. '512x0e'), got {irreps_feature}")
        radial_channels = [int(cfg["num_basis"])] + cfg["radial_hidden"]

        self.radial_basis = build_radial_basis(cfg["radial_basis"], int(cfg["num_basis"]), self.cutoff)
        self.envelope = PolynomialEnvelope(self.cutoff, envelope_exponent) if envelope else None
        self.atom_embedding = AtomEmbedding(irreps_node, num_atom_types)
        self.edge_degree_embedding = EdgeDegreeEmbedding(
            irreps_node, self.irreps_sh, radial_channels, float(cfg["avg_degree"]), tp_backend
        )
        self.blocks = nn.ModuleList(
            EquiformerBlock(
                irreps_node,
                self.irreps_sh,
                cfg["irreps_head"],
                int(cfg["num_heads"]),
                cfg["irreps_mlp_mid"],
                radial_channels,
                irreps_out=irreps_feature if i == int(cfg["num_layers"]) - 1 else irreps_node,
                attention=cfg["attention"],
                nonlinear_message=bool(cfg["nonlinear_message"]),
                alpha_drop=float(cfg["alpha_drop"]),
                irreps_pre_attn=irreps_pre_attn,
                negative_slope=negative_slope,
                tp_backend=tp_backend,
            )
            for i in range(int(cfg["num_layers"]))
        )
        if not self.blocks:
            raise ValueError("num_layers must be >= 1")
        self.norm = EquivariantLayerNorm(irreps_feature)
        self.head = nn.Sequential(
            EquivariantLinear(irreps_feature, irreps_feature),
            nn.SiLU(),
            EquivariantLinear(irreps_feature, f"{self.num_targets}x0e"),
        )
        self.register_buffer("target_mean", self._per_target(target_mean, 0.0, "target_mean"), persistent=False)
        self.register_buffer("target_std", self._per_target(target_std, 1.0, "target_std"), persistent=False)

    def _per_target(self, value: float | list[float] | None, default: float, name: str) -> Tensor:
        values = [default] if value is None else value if isinstance(value, (list, tuple)) else [value]
        if len(values) not in (1, self.num_targets):
            raise ValueError(f"{name} has {len(values)} entries for {self.num_targets} targets")
        return torch.tensor([float(v) for v in values], dtype=torch.get_default_dtype()).expand(self.num_targets).clone()

    def no_weight_decay(self) -> set[str]:
        """Names of parameters the paper trains without weight decay (norms, biases of torch Linears, radial basis)."""
        return no_weight_decay_names(self, (nn.LayerNorm, EquivariantLayerNorm, GaussianRadialBasis, BesselRadialBasis), (nn.Linear,))

    def embed(self, data: Any) -> tuple[Tensor, Tensor, int]:
        """Per-atom scalar features after the final norm.

        Returns:
            features [N, irreps_feature.dim], batch [N], number of graphs B.
        """
        for field in ("z", "pos"):
            if getattr(data, field, None) is None:
                raise ValueError(f"Equiformer: input has no {field!r} field (expected a PyG Data/Batch of the data contract)")
        z = data.z
        batch = getattr(data, "batch", None)
        if batch is None:
            batch, num_graphs = torch.zeros_like(z), 1
        else:
            num_graphs = int(data.num_graphs) if hasattr(data, "num_graphs") else int(batch.max()) + 1
        edge_index, edge_vec = build_edges(data, self.cutoff)
        edge_len = edge_vec.norm(dim=-1)
        edge_sh = o3.spherical_harmonics(self.irreps_sh, edge_vec, normalize=True, normalization="component")
        edge_scalars = self.radial_basis(edge_len)
        edge_weight = self.envelope(edge_len) if self.envelope is not None else None
        num_nodes = z.shape[0]

        x = self.atom_embedding(z) + self.edge_degree_embedding(edge_index, edge_sh, edge_scalars, num_nodes, edge_weight)
        for block in self.blocks:
            x = block(x, edge_index, edge_sh, edge_scalars, edge_weight)
        return self.norm(x), batch, num_graphs

    def _predict(self, data: Any) -> Tensor:
        features, batch, num_graphs = self.embed(data)
        per_atom = self.head(features)  # [N, T]
        if self.readout == "sum":
            y = segment_sum(per_atom, batch, num_graphs) / math.sqrt(self.avg_num_nodes)
        else:
            y = segment_mean(per_atom, batch, num_graphs)
        return y * self.target_std + self.target_mean

    def forward(self, data: Any) -> dict[str, Tensor]:
        """data: PyG Data/Batch (z [N], pos [N,3] Å, cell [B,3,3], pbc [B,3], batch [N]).

        Returns:
            ``{"y": [B, T]}``, plus ``"energy"`` [B] (= y[:, 0]) and ``"forces"`` [N, 3]
            (= -dE/dpos, with a graph for training when ``self.training``) if ``predict_forces``.
        """
        if not self.predict_forces:
            return {"y": self._predict(data)}
        create_graph = self.training
        with torch.enable_grad():
            pos = data.pos if data.pos.requires_grad else data.pos.detach().requires_grad_(True)
            data = copy.copy(data)  # shallow: the caller's object keeps its pos
            data.pos = pos
            y = self._predict(data)
            energy = y[:, 0]
            (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)
        out = {"y": y, "energy": energy, "forces": -grad}
        if not create_graph:
            out = {k: v.detach() for k, v in out.items()}
        return out
