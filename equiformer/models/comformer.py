"""ComFormer: iComFormer and eComFormer (Yan, Fu, Qian, Qian, Ji; ICLR 2024), written from the paper.

Both models read a crystal through its lattice-based graph
(:func:`equiformer.graph.crystal.build_crystal_graph`): the k = 25 nearest periodic images
of every atom (ties kept) plus the lattice self-edges ``i -> i +- l_k``, where ``(l1, l2, l3)``
is the crystal's canonical right-handed lattice frame.

Features (Matformer/ComFormer conventions): an edge of length ``r`` is embedded as
``softplus(W rbf(-0.75 / r))`` with 256 fixed Gaussians on [-4, 0]; a cosine as
``softplus(W rbf(cos))`` with 256 Gaussians on [-1, 1].

**Node-wise transformer layer** (both models). For the edge j -> i with feature ``f_ji``::

    q_i = W_Q h_i,  k = W_K h,  v = W_V h,  e_ji = W_E f_ji                      (per head)
    a_ji = q_i * MLP_K(k_i | k_j | e_ji) / sqrt(d)                           (channel-wise)
    m_ji = sigmoid(BN(a_ji)) * MLP_V(v_i | v_j | e_ji)
    h_i <- softplus(h_i + BN(W_O sum_j m_ji))

(the attention is a per-channel sigmoid gate, not a softmax, as in Matformer/ComFormer).

**Edge-wise transformer layer** (iComFormer). Edge ``f_ji`` attends to the three lattice
vectors of the frame, each described by its length and its angle to the edge::

    y_k = rbf(-0.75 / |l_k|),  c_k = rbf_angle(cos(e_ji, l_k)),  k = 1, 2, 3
    a_k = W_Q f_ji * MLP_K(W_K f_ji | W_K^k y_k | W_C c_k) / sqrt(d)
    f_ji <- softplus(f_ji + BN(sum_k W_O [sigmoid(BN(a_k)) * MLP_V(W_V f_ji | W_V^k y_k | W_C c_k)]))

The cosines to a right-handed frame make iComFormer SE(3)-invariant but not O(3)-invariant:
a chiral crystal and its mirror image get different inputs (paper, Sec. 3). Measured here:
the atom features of alpha-quartz and of its mirror image differ, but as the edge-wise layer
adds up one term per lattice vector the pooled prediction of a freshly initialised model
differs only at ~1e-12 (the signal is of higher order in the weights; larger weights show
it plainly), and a few hundred Adam steps on the pair do not separate them.

**Equivariant update** (eComFormer, between node layers 1 and 2): node scalars are lifted to
``64x0e + 8x1o + 8x2e`` by a tensor product with the spherical harmonics (l <= 2) of the edge
directions (weights from the edge features, mean over neighbours, residual), then contracted
back to ``64x0e`` the same way; BN, softplus, linear, softplus, plus a linear skip. Its
tensor products keep parity, so eComFormer is O(3)-invariant (a mirror image gives the same
prediction).

Readout: mean over atoms (intensive targets: formation energy per atom, band gap), then
``Linear -> SiLU -> Linear`` to ``y`` [B, T].

Paper hyperparameters (official MP/JARVIS scripts): iComFormer 4 node layers + 1 edge layer,
eComFormer 3 node layers + 1 equivariant update; 256 channels, 1 head, 256 RBFs, k = 25,
lattice self-edges on. Deviations: atoms are embedded by a learned table (``nn.Embedding``)
instead of the 92 CGCNN features; undirected edges are not duplicated; the lattice frame is
that of the primitive lattice and canonical (see :mod:`equiformer.graph.crystal`).

The graph is built inside ``forward`` (k-NN search in torch on the data's device; the lattice
frame per structure on the host, ~3-6 ms). Each structure's whole graph (edges, shifts, frame) is
memoised in ``model.lattice_cache``, keyed by its bytes, so later epochs only concatenate cached
graphs (~4 ms for a batch of 64 MP structures instead of ~90 ms for the search and the lattice
self-edges; measured on one CPU thread). ``forward(data, graph=model.crystal_graph(data))``
reuses a graph; :func:`equiformer.graph.crystal.fill_graph_cache` fills the cache ahead of
training in worker processes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from equiformer.graph.crystal import CrystalGraph, LatticeCache, build_crystal_graph
from equiformer.nn import segment_mean, segment_sum

__all__ = [
    "ComFormerEdgeLayer",
    "ComFormerNodeLayer",
    "ECOMFORMER_PRESETS",
    "EComFormer",
    "EquivariantUpdate",
    "GaussianExpansion",
    "ICOMFORMER_PRESETS",
    "IComFormer",
]

_COMMON_MP = {
    "hidden": 256,
    "num_heads": 1,
    "num_rbf": 256,
    "fc_features": 256,
    "k": 25,
    "graph": "knn",
    "cutoff": None,
    "self_edges": True,
    "norm": "batch",
}
_COMMON_TINY = {**_COMMON_MP, "hidden": 32, "num_rbf": 32, "fc_features": 32, "k": 12}

#: named iComFormer architectures; explicit keyword arguments override a preset's entries
ICOMFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "mp": {**_COMMON_MP, "num_node_layers": 4, "num_edge_layers": 1, "num_angle_rbf": 256},
    "tiny": {**_COMMON_TINY, "num_node_layers": 2, "num_edge_layers": 1, "num_angle_rbf": 32},
}
ICOMFORMER_PRESETS["jarvis"] = dict(ICOMFORMER_PRESETS["mp"])

#: named eComFormer architectures
ECOMFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "mp": {**_COMMON_MP, "num_node_layers": 3, "num_scalars": 64, "num_vectors": 8, "lmax": 2},
    "tiny": {**_COMMON_TINY, "num_node_layers": 2, "num_scalars": 16, "num_vectors": 4, "lmax": 2},
}
ECOMFORMER_PRESETS["jarvis"] = dict(ECOMFORMER_PRESETS["mp"])

#: edge lengths enter as -INV_LENGTH_SCALE / r (Å), expanded on [-4, 0]
INV_LENGTH_SCALE = 0.75


class GaussianExpansion(nn.Module):
    """Fixed Gaussians ``exp(-gamma (x - mu_k)^2)``, ``mu_k`` evenly spaced on [vmin, vmax], gamma = 1 / spacing.

    Args:
        vmin, vmax: range of the centres; bins: number of Gaussians (K).
    Shapes: x [...] -> [..., K].
    """

    def __init__(self, vmin: float, vmax: float, bins: int) -> None:
        super().__init__()
        if bins < 2:
            raise ValueError(f"GaussianExpansion needs at least 2 bins, got {bins}")
        centres = torch.linspace(float(vmin), float(vmax), int(bins))
        self.register_buffer("centres", centres)
        self.gamma = 1.0 / float(centres[1] - centres[0])

    def forward(self, x: Tensor) -> Tensor:
        return torch.exp(-self.gamma * (x.unsqueeze(-1) - self.centres.to(x.dtype)) ** 2)


def _scalar_embedding(vmin: float, vmax: float, bins: int, dim: int) -> nn.Sequential:
    """x [...] -> softplus(W rbf(x)) [..., dim]."""
    return nn.Sequential(GaussianExpansion(vmin, vmax, bins), nn.Linear(bins, dim), nn.Softplus())


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(dim)
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'layer' or 'none', got {kind!r}")


class _TripleMLP(nn.Module):
    """``MLP(a | b | c) = W2 silu(W1a a + W1b b + W1c c + b1) + b2`` without materialising the concatenation,
    so that parts shared by many rows (per node, per graph) are projected once and then broadcast."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.first = nn.Linear(3 * dim, dim)
        self.second = nn.Linear(dim, dim)
        self.dim = dim

    def part(self, x: Tensor, which: int) -> Tensor:
        """W1[which] x (no bias): [..., dim] -> [..., dim]."""
        d = self.dim
        return x @ self.first.weight[:, which * d : (which + 1) * d].T

    def finish(self, pre: Tensor) -> Tensor:
        return self.second(F.silu(pre + self.first.bias))


class ComFormerNodeLayer(nn.Module):
    """Node-wise transformer layer (see the module doc).

    Args:
        dim: node channels (= per-head channels); edge_dim: edge feature channels;
        num_heads: heads (each of ``dim`` channels, concatenated and projected back);
        norm: ``"batch"`` (paper), ``"layer"`` or ``"none"``.
    Shapes: h [N, dim], edge_index [2, E] (row 0 = j, row 1 = i), f [E, edge_dim] -> [N, dim].
    """

    def __init__(self, dim: int, edge_dim: int, num_heads: int = 1, norm: str = "batch") -> None:
        super().__init__()
        self.dim, self.heads = dim, num_heads
        hd = num_heads * dim
        self.lin_query = nn.Linear(dim, hd)
        self.lin_key = nn.Linear(dim, hd)
        self.lin_value = nn.Linear(dim, hd)
        self.lin_edge = nn.Linear(edge_dim, hd)
        self.key_mlp = _TripleMLP(dim)
        self.value_mlp = _TripleMLP(dim)
        self.att_norm = _norm(norm, dim)
        self.lin_out = nn.Linear(hd, dim)
        self.norm = _norm(norm, dim)

    def forward(self, h: Tensor, edge_index: Tensor, f: Tensor) -> Tensor:
        j, i = edge_index[0], edge_index[1]
        n, e_count, H, C = h.shape[0], f.shape[0], self.heads, self.dim
        q = self.lin_query(h).view(n, H, C)
        k = self.lin_key(h).view(n, H, C)
        v = self.lin_value(h).view(n, H, C)
        e = self.lin_edge(f).view(e_count, H, C)
        key = self.key_mlp.finish(
            self.key_mlp.part(k, 0)[i] + self.key_mlp.part(k, 1)[j] + self.key_mlp.part(e, 2)
        )
        alpha = q[i] * key / math.sqrt(C)
        gate = torch.sigmoid(self.att_norm(alpha.reshape(-1, C))).view(e_count, H, C)
        value = self.value_mlp.finish(
            self.value_mlp.part(v, 0)[i] + self.value_mlp.part(v, 1)[j] + self.value_mlp.part(e, 2)
        )
        msg = (gate * value).reshape(e_count, H * C)
        agg = segment_sum(msg, i, n)
        return F.softplus(h + self.norm(self.lin_out(agg)))


class ComFormerEdgeLayer(nn.Module):
    """Edge-wise transformer layer of iComFormer: each edge attends to its graph's three lattice vectors.

    Args:
        dim: edge channels; num_heads; norm: as :class:`ComFormerNodeLayer`.
    Shapes: f [E, dim]; lattice_len [B, 3, dim] (embedded lengths of l1, l2, l3 per graph);
        edge_graph [E] (graph of each edge); angle [E, 3, dim] (embedded cos(e, l_k)) -> [E, dim].
    """

    def __init__(self, dim: int, num_heads: int = 1, norm: str = "batch") -> None:
        super().__init__()
        self.dim, self.heads = dim, num_heads
        hd = num_heads * dim
        self.lin_query = nn.Linear(dim, hd)
        self.lin_key = nn.Linear(dim, hd)
        self.lin_value = nn.Linear(dim, hd)
        self.lin_key_lattice = nn.ModuleList([nn.Linear(dim, hd) for _ in range(3)])
        self.lin_value_lattice = nn.ModuleList([nn.Linear(dim, hd) for _ in range(3)])
        self.lin_angle = nn.Linear(dim, hd, bias=False)
        self.key_mlp = _TripleMLP(dim)
        self.value_mlp = _TripleMLP(dim)
        self.att_norm = _norm(norm, dim)
        self.lin_out = nn.Linear(hd, dim)
        self.norm = _norm(norm, dim)

    def forward(self, f: Tensor, lattice_len: Tensor, edge_graph: Tensor, angle: Tensor) -> Tensor:
        E, H, C = f.shape[0], self.heads, self.dim
        B = lattice_len.shape[0]
        q = self.lin_query(f).view(E, 1, H, C)
        kx = self.key_mlp.part(self.lin_key(f).view(E, 1, H, C), 0)
        vx = self.value_mlp.part(self.lin_value(f).view(E, 1, H, C), 0)
        ky = torch.stack([lin(lattice_len[:, m]) for m, lin in enumerate(self.lin_key_lattice)], 1).view(B, 3, H, C)
        vy = torch.stack([lin(lattice_len[:, m]) for m, lin in enumerate(self.lin_value_lattice)], 1).view(B, 3, H, C)
        ky = self.key_mlp.part(ky, 1)[edge_graph]  # per graph, then broadcast to edges
        vy = self.value_mlp.part(vy, 1)[edge_graph]
        a = self.lin_angle(angle).view(E, 3, H, C)
        key = self.key_mlp.finish(kx + ky + self.key_mlp.part(a, 2))
        alpha = q * key / math.sqrt(C)
        gate = torch.sigmoid(self.att_norm(alpha.reshape(-1, C))).view(E, 3, H, C)
        value = self.value_mlp.finish(vx + vy + self.value_mlp.part(a, 2))
        out = self.lin_out((gate * value).reshape(E, 3, H * C)).sum(dim=1)
        return F.softplus(f + self.norm(out))


class EquivariantUpdate(nn.Module):
    """eComFormer's equivariant node update (e3nn tensor products with edge spherical harmonics).

    Args:
        dim: node channels; edge_dim: edge feature channels; num_scalars / num_vectors: the
            multiplicities of ``0e`` and of ``1o``, ``2e`` (..., up to ``lmax``) in the hidden irreps;
        lmax: degree of the edge spherical harmonics; norm: as :class:`ComFormerNodeLayer`.
    Shapes: h [N, dim], edge_index [2, E], f [E, edge_dim], edge_vec [E, 3] (centre -> neighbour) -> [N, dim].
    """

    def __init__(
        self, dim: int, edge_dim: int, num_scalars: int = 64, num_vectors: int = 8, lmax: int = 2, norm: str = "batch"
    ) -> None:
        super().__init__()
        from e3nn import o3

        self.sh_irreps = o3.Irreps.spherical_harmonics(lmax)
        scalars = o3.Irreps(f"{num_scalars}x0e")
        hidden = o3.Irreps(f"{num_scalars}x0e") + o3.Irreps(
            [(num_vectors, (l, (-1) ** l)) for l in range(1, lmax + 1)]
        )
        self.hidden_irreps = hidden.simplify()
        self.num_scalars = num_scalars
        self.lin_in = nn.Linear(dim, num_scalars)
        self.tp_up = o3.FullyConnectedTensorProduct(scalars, self.sh_irreps, self.hidden_irreps, shared_weights=False)
        self.tp_down = o3.FullyConnectedTensorProduct(self.hidden_irreps, self.sh_irreps, scalars, shared_weights=False)
        self.weights_up = nn.Sequential(
            nn.Linear(edge_dim, edge_dim), nn.Softplus(), nn.Linear(edge_dim, self.tp_up.weight_numel)
        )
        self.weights_down = nn.Sequential(
            nn.Linear(edge_dim, edge_dim), nn.Softplus(), nn.Linear(edge_dim, self.tp_down.weight_numel)
        )
        self.norm = _norm(norm, num_scalars)
        self.lin_out = nn.Linear(num_scalars, dim)
        self.skip = nn.Linear(dim, dim)

    def forward(self, h: Tensor, edge_index: Tensor, f: Tensor, edge_vec: Tensor) -> Tensor:
        from e3nn import o3

        j, i = edge_index[0], edge_index[1]
        n = h.shape[0]
        sh = o3.spherical_harmonics(self.sh_irreps, edge_vec, normalize=True, normalization="component")
        s = self.lin_in(h)
        x = segment_mean(self.tp_up(s[j], sh, self.weights_up(f)), i, n)
        x = torch.cat([x[:, : self.num_scalars] + s, x[:, self.num_scalars :]], dim=1)  # residual on the scalars
        y = segment_mean(self.tp_down(x[j], sh, self.weights_down(f)), i, n)
        return F.softplus(self.lin_out(F.softplus(self.norm(y)))) + self.skip(h)


class _ComFormerBase(nn.Module):
    """Shared parts: configuration, atom/edge embeddings, crystal graph, readout."""

    PRESETS: dict[str, dict[str, Any]] = {}
    NAME = "ComFormer"

    def _configure(self, cfg: dict[str, Any]) -> dict[str, Any]:
        preset = cfg["preset"]
        if preset not in self.PRESETS:
            raise ValueError(f"unknown {self.NAME} preset {preset!r}; choose one of {sorted(self.PRESETS)}")
        for key, value in self.PRESETS[preset].items():
            if cfg.get(key) is None and key in cfg:
                cfg[key] = value
        if cfg["graph"] not in ("knn", "radius"):
            raise ValueError(f"{self.NAME}: graph must be 'knn' or 'radius', got {cfg['graph']!r}")
        if cfg["graph"] == "radius" and not (cfg.get("cutoff") or 0) > 0:
            raise ValueError(f"{self.NAME}: graph='radius' needs a positive cutoff (Å)")
        if cfg["readout"] not in ("mean", "sum"):
            raise ValueError(f"{self.NAME}: readout must be 'mean' or 'sum', got {cfg['readout']!r}")
        if int(cfg["num_targets"]) < 1:
            raise ValueError(f"{self.NAME}: num_targets must be >= 1, got {cfg['num_targets']}")
        return cfg

    def _build_common(self, cfg: dict[str, Any]) -> None:
        dim = int(cfg["hidden"])
        self.atom_embedding = nn.Embedding(int(cfg["num_atom_types"]), dim)
        self.edge_embedding = _scalar_embedding(-4.0, 0.0, int(cfg["num_rbf"]), dim)
        #: memo of per-structure graphs and lattice frames (host-side work), not part of the state dict
        self.lattice_cache = LatticeCache(int(cfg["lattice_cache"])) if int(cfg["lattice_cache"]) > 0 else None
        fc = int(cfg["fc_features"])
        self.head = nn.Sequential(nn.Linear(dim, fc), nn.SiLU(), nn.Linear(fc, int(cfg["num_targets"])))

    def graph_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~equiformer.graph.crystal.build_crystal_graph` for this model's graph."""
        c = self.config
        return {"k": int(c["k"]), "graph": c["graph"], "cutoff": c["cutoff"], "self_edges": bool(c["self_edges"]),
                "primitive": bool(c["primitive"])}

    def crystal_graph(self, data: Any) -> CrystalGraph:
        """The lattice-based graph this model reads (k-NN or radius edges + lattice self-edges)."""
        return build_crystal_graph(data, cache=self.lattice_cache, **self.graph_options())

    def _embed_length(self, r: Tensor) -> Tensor:
        return self.edge_embedding(-INV_LENGTH_SCALE / r)

    def _readout(self, h: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        pool = segment_mean if self.config["readout"] == "mean" else segment_sum
        pooled = pool(h, batch, num_graphs)
        return self.head(pooled)

    @staticmethod
    def _batch(data: Any) -> tuple[Tensor, int]:
        n = data.pos.shape[0]
        batch = getattr(data, "batch", None)
        if batch is None:
            batch = torch.zeros(n, dtype=torch.long, device=data.pos.device)
        cell = data.cell
        num_graphs = cell.shape[0] if cell.dim() == 3 else 1
        return batch, max(num_graphs, int(batch.max()) + 1 if n else 1)

    def _check_z(self, z: Tensor) -> None:
        if z.numel() and (int(z.min()) < 1 or int(z.max()) >= self.atom_embedding.num_embeddings):
            raise ValueError(
                f"{self.NAME}: atomic numbers must lie in [1, {self.atom_embedding.num_embeddings - 1}], "
                f"got {int(z.min())}..{int(z.max())}"
            )


class IComFormer(_ComFormerBase):
    """iComFormer: node-wise transformer layers + an edge-wise layer over the lattice frame (SE(3)-invariant).

    Arguments left ``None`` come from ``preset`` (``"mp"``/``"jarvis"``: the paper's model, ~5M
    parameters; ``"tiny"``: 32 channels, for tests and smoke runs).

    Args:
        preset: ``"mp"``, ``"jarvis"`` or ``"tiny"``.
        num_targets: width T of the output ``y`` [B, T].
        hidden: node and edge channels; num_heads: attention heads.
        num_node_layers, num_edge_layers: node-wise layers; edge-wise layers (edge layer l runs
            after node layer l, so the paper's 4 + 1 is node, edge, node, node, node).
        num_rbf, num_angle_rbf: Gaussians of the length and cosine embeddings.
        fc_features: width of the readout MLP.
        k: neighbours of the k-NN graph; graph: ``"knn"`` or ``"radius"``; cutoff: radius (Å).
        self_edges: add the lattice self-edges; primitive: lattice of the primitive cell.
        norm: ``"batch"`` (paper), ``"layer"`` or ``"none"``; readout: ``"mean"`` (intensive) or ``"sum"``.
        num_atom_types: size of the atom embedding table (atomic numbers 1..num_atom_types-1).
        lattice_cache: structures whose graphs (edges + lattice frame) are memoised across calls (0: none).
    Forward: ``data`` (``z``, ``pos``, ``cell`` [B,3,3], ``pbc`` [B,3], ``batch``) -> ``{"y": [B, T]}``.
    """

    PRESETS = ICOMFORMER_PRESETS
    NAME = "IComFormer"

    def __init__(
        self,
        preset: str = "mp",
        num_targets: int = 1,
        hidden: int | None = None,
        num_heads: int | None = None,
        num_node_layers: int | None = None,
        num_edge_layers: int | None = None,
        num_rbf: int | None = None,
        num_angle_rbf: int | None = None,
        fc_features: int | None = None,
        k: int | None = None,
        graph: str | None = None,
        cutoff: float | None = None,
        self_edges: bool | None = None,
        primitive: bool = True,
        norm: str | None = None,
        readout: str = "mean",
        num_atom_types: int = 119,
        lattice_cache: int = 100_000,
    ) -> None:
        super().__init__()
        cfg = self._configure({k_: v for k_, v in locals().items() if k_ not in ("self", "__class__")})
        if cfg["num_edge_layers"] > cfg["num_node_layers"]:
            raise ValueError(
                f"IComFormer: num_edge_layers ({cfg['num_edge_layers']}) > num_node_layers ({cfg['num_node_layers']})"
            )
        self.config: dict[str, Any] = cfg
        dim = int(cfg["hidden"])
        self._build_common(cfg)
        self.angle_embedding = _scalar_embedding(-1.0, 1.0, int(cfg["num_angle_rbf"]), dim)
        heads, layers = int(cfg["num_heads"]), int(cfg["num_node_layers"])
        self.node_layers = nn.ModuleList([ComFormerNodeLayer(dim, dim, heads, cfg["norm"]) for _ in range(layers)])
        self.edge_layers = nn.ModuleList(
            [ComFormerEdgeLayer(dim, int(cfg["num_heads"]), cfg["norm"]) for _ in range(int(cfg["num_edge_layers"]))]
        )

    def atom_features(self, data: Any, graph: CrystalGraph | None = None) -> Tensor:
        """Atom features after the last node layer, [N, hidden] (invariant; what the readout pools)."""
        self._check_z(data.z)
        batch, _ = self._batch(data)
        g = graph if graph is not None else self.crystal_graph(data)
        dtype = data.pos.dtype
        vec = g.edge_vec.to(dtype)
        r = torch.linalg.vector_norm(vec, dim=1)
        h = self.atom_embedding(data.z)
        f = self._embed_length(r)
        edge_graph = batch[g.edge_index[1]]
        lattice = g.lattice.to(dtype)  # [B, 3, 3]
        lat_len = torch.linalg.vector_norm(lattice, dim=-1)  # [B, 3]
        lat_feat = self._embed_length(lat_len)  # [B, 3, dim]
        cos = torch.einsum("ed,ekd->ek", vec / r.unsqueeze(1), (lattice / lat_len.unsqueeze(-1))[edge_graph])
        angle = self.angle_embedding(cos.clamp(-1.0, 1.0))  # [E, 3, dim]
        for layer_index, node_layer in enumerate(self.node_layers):
            h = node_layer(h, g.edge_index, f)
            if layer_index < len(self.edge_layers):
                f = self.edge_layers[layer_index](f, lat_feat, edge_graph, angle)
        return h

    def forward(self, data: Any, graph: CrystalGraph | None = None) -> dict[str, Tensor]:
        """``{"y": [B, T]}``; ``graph`` may be passed to reuse a precomputed :meth:`crystal_graph`."""
        batch, num_graphs = self._batch(data)
        return {"y": self._readout(self.atom_features(data, graph), batch, num_graphs)}


class EComFormer(_ComFormerBase):
    """eComFormer: node-wise transformer layers + an e3nn equivariant update (O(3)-invariant output).

    Args: as :class:`IComFormer` (no edge layers) plus
        num_scalars, num_vectors, lmax: the equivariant update's hidden irreps
        (``64x0e + 8x1o + 8x2e`` in the paper) and spherical-harmonic degree.
    Forward: ``data`` -> ``{"y": [B, T]}``; the update runs after the first node layer.
    """

    PRESETS = ECOMFORMER_PRESETS
    NAME = "EComFormer"

    def __init__(
        self,
        preset: str = "mp",
        num_targets: int = 1,
        hidden: int | None = None,
        num_heads: int | None = None,
        num_node_layers: int | None = None,
        num_scalars: int | None = None,
        num_vectors: int | None = None,
        lmax: int | None = None,
        num_rbf: int | None = None,
        fc_features: int | None = None,
        k: int | None = None,
        graph: str | None = None,
        cutoff: float | None = None,
        self_edges: bool | None = None,
        primitive: bool = True,
        norm: str | None = None,
        readout: str = "mean",
        num_atom_types: int = 119,
        lattice_cache: int = 100_000,
    ) -> None:
        super().__init__()
        cfg = self._configure({k_: v for k_, v in locals().items() if k_ not in ("self", "__class__")})
        if cfg["num_node_layers"] < 1:
            raise ValueError("EComFormer: num_node_layers must be >= 1")
        self.config: dict[str, Any] = cfg
        dim = int(cfg["hidden"])
        self._build_common(cfg)
        heads, layers = int(cfg["num_heads"]), int(cfg["num_node_layers"])
        self.node_layers = nn.ModuleList([ComFormerNodeLayer(dim, dim, heads, cfg["norm"]) for _ in range(layers)])
        self.equivariant = EquivariantUpdate(
            dim, dim, int(cfg["num_scalars"]), int(cfg["num_vectors"]), int(cfg["lmax"]), cfg["norm"]
        )

    def atom_features(self, data: Any, graph: CrystalGraph | None = None) -> Tensor:
        """Atom features after the last node layer, [N, hidden] (invariant; what the readout pools)."""
        self._check_z(data.z)
        g = graph if graph is not None else self.crystal_graph(data)
        vec = g.edge_vec.to(data.pos.dtype)
        r = torch.linalg.vector_norm(vec, dim=1)
        h = self.atom_embedding(data.z)
        f = self._embed_length(r)
        for layer_index, node_layer in enumerate(self.node_layers):
            h = node_layer(h, g.edge_index, f)
            if layer_index == 0:
                h = self.equivariant(h, g.edge_index, f, vec)
        return h

    def forward(self, data: Any, graph: CrystalGraph | None = None) -> dict[str, Tensor]:
        """``{"y": [B, T]}``; ``graph`` may be passed to reuse a precomputed :meth:`crystal_graph`."""
        batch, num_graphs = self._batch(data)
        return {"y": self._readout(self.atom_features(data, graph), batch, num_graphs)}
