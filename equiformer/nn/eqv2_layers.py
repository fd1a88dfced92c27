"""EquiformerV2 layers on spherical-harmonic coefficient arrays (Liao, Wood, Das & Smidt, ICLR 2024).

Node features are arrays ``x`` [N, (lmax+1)^2, C]: C channels of real spherical-harmonic coefficients
in e3nn's basis (degree ``l`` at ``[l^2, (l+1)^2)``). Edge-frame features are truncated arrays
[E, n, C] (see :mod:`equiformer.nn.so2`). Pieces:

* :class:`SO3Linear`: one channel-mixing matrix per degree, bias on ``l = 0``;
* :class:`SeparableLayerNorm`: the paper's "layer_norm_sh": LayerNorm of the ``l = 0`` channels, and
  one RMS scale shared by all ``l > 0`` coefficients (degree-balanced), learned scale per (l, channel);
* :class:`SeparableS2Activation`: SiLU of separate scalars for ``l = 0``; for ``l > 0`` a SiLU applied
  point-wise on an S2 grid (project, act, project back);
* :class:`GateActivation`: SiLU on ``l = 0``, sigmoid gates per (degree, channel) on ``l > 0`` (exactly
  equivariant alternative to the S2 activation, the paper's ablation);
* :class:`S2FeedForward`: ``SO3Linear -> activation -> SO3Linear`` (with the grid MLP of the OC20 configs);
* :class:`SO2GraphAttention`: message ``SO2Conv(rad) -> act -> SO2Conv`` in the edge frame, MLP attention
  with re-normalised logits, softmax over incoming edges, rotate back, sum, project;
* :class:`EdgeDegreeEmbedding`: radial function of each edge as ``m = 0`` coefficients, rotated back
  and summed over incoming edges;
* :class:`GraphDropPath`: stochastic depth per graph (identity at eval).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from equiformer.o3.buffers import ExactConstants
from equiformer.o3.so3_grid import S2Grid
from equiformer.o3.wigner import order_major_coefficients, truncated_coefficients

from .activation import SmoothLeakyReLU
from .radial import RadialMLP
from .scatter import segment_softmax, segment_sum
from .so2 import EdgeRotation, SO2Convolution

__all__ = [
    "ACTIVATIONS",
    "EdgeDegreeEmbedding",
    "GateActivation",
    "GraphDropPath",
    "S2FeedForward",
    "SO2GraphAttention",
    "SO3Linear",
    "SeparableLayerNorm",
    "SeparableS2Activation",
]

#: ``"s2"``: separable S2 activation (the paper's); ``"gate"``: gate activation (exactly equivariant)
ACTIVATIONS = ("s2", "gate")


def _degree_of_coefficients(lmax: int, mmax: int | None = None, layout: str = "degree") -> list[int]:
    """Degree of each coefficient of the layout (``"degree"``: node frame, ``"order"``: edge frame)."""
    mmax = lmax if mmax is None else mmax
    coefficients = truncated_coefficients if layout == "degree" else order_major_coefficients
    return [l for l, _ in coefficients(lmax, mmax)]


class SO3Linear(nn.Module):
    """``y_l = W_l x_l`` per degree (shared over m), bias added to ``l = 0`` only.

    Args:
        in_channels, out_channels: C_in, C_out.
        lmax: highest degree of the (full) coefficient layout.
        bias: learn a bias on the ``l = 0`` outputs.
    """

    def __init__(self, in_channels: int, out_channels: int, lmax: int, bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.lmax = int(in_channels), int(out_channels), int(lmax)
        bound = 1.0 / math.sqrt(self.in_channels)
        self.weight = nn.Parameter(torch.empty(self.lmax + 1, self.out_channels, self.in_channels).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None
        self.register_buffer(
            "degree_index", torch.tensor(_degree_of_coefficients(self.lmax), dtype=torch.long), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        """x [N, (lmax+1)^2, C_in] -> [N, (lmax+1)^2, C_out]."""
        weight = self.weight.index_select(0, self.degree_index)  # [(lmax+1)^2, C_out, C_in]
        out = torch.einsum("nki,koi->nko", x, weight)
        if self.bias is None:
            return out
        return torch.cat([out[:, :1] + self.bias, out[:, 1:]], dim=1)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, lmax={self.lmax}, bias={self.bias is not None}"


class SeparableLayerNorm(ExactConstants):
    """EquiformerV2's separable layer norm ("layer_norm_sh") of [N, (lmax+1)^2, C].

    ``l = 0``: ``LayerNorm(C)``. ``l > 0``: divide by ``sqrt(s + eps)`` with ``s`` the mean over channels of
    ``(1/lmax) sum_{l>0} mean_m x_lm^2`` (each degree weighted equally), then scale by a learned
    ``gamma[l, c]``; no centring, so it is equivariant.

    Args:
        lmax: highest degree.
        channels: C.
        eps: added to the mean square.
    """

    def __init__(self, lmax: int, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.lmax, self.channels, self.eps = int(lmax), int(channels), float(eps)
        self.norm_l0 = nn.LayerNorm(self.channels, eps=self.eps)
        if self.lmax > 0:
            self.affine_weight = nn.Parameter(torch.ones(self.lmax, self.channels))
            degrees = _degree_of_coefficients(self.lmax)[1:]
            balance = torch.tensor([1.0 / ((2 * l + 1) * self.lmax) for l in degrees], dtype=torch.float64, device="cpu")
            self.register_constant("balance", balance)
            self.register_buffer("degree_index", torch.tensor([l - 1 for l in degrees], dtype=torch.long), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x [N, (lmax+1)^2, C] -> same shape."""
        out0 = self.norm_l0(x[:, :1])
        if self.lmax == 0:
            return out0
        rest = x[:, 1:]
        mean_square = torch.einsum("nkc,k->n", rest.pow(2), self.balance) / self.channels
        scale = (mean_square + self.eps).rsqrt()[:, None, None]
        gamma = self.affine_weight.index_select(0, self.degree_index)  # [(lmax+1)^2 - 1, C]
        return torch.cat([out0, rest * scale * gamma], dim=1)

    def extra_repr(self) -> str:
        return f"lmax={self.lmax}, channels={self.channels}, eps={self.eps}"


class SeparableS2Activation(nn.Module):
    """``l = 0``: ``SiLU(scalars)``; ``l > 0``: ``from_grid(SiLU(to_grid(x)))`` on an S2 grid.

    Works on node-frame arrays ([.., (lmax+1)^2, C], ``layout="degree"``) or m-truncated edge-frame
    arrays ([.., n, C], ``layout="order"``); coefficient 0 is ``l = 0`` in both. Equivariant up to the
    grid's quadrature error (exactly for rotations about +y by multiples of ``2 pi / n_lon``).

    Args:
        lmax, mmax: coefficients kept.
        resolution: grid size (see :class:`equiformer.o3.so3_grid.S2Grid`).
        layout: ``"degree"`` or ``"order"``.
    """

    def __init__(
        self,
        lmax: int,
        mmax: int | None = None,
        resolution: int | tuple[int, int] | None = None,
        layout: str = "degree",
    ) -> None:
        super().__init__()
        self.grid = S2Grid(lmax, mmax, resolution, layout)
        self.act = nn.SiLU()

    def forward(self, scalars: Tensor, x: Tensor) -> Tensor:
        """scalars [B, C], x [B, n, C] -> [B, n, C]."""
        tensors = self.grid.from_grid(self.act(self.grid.to_grid(x)))
        return torch.cat([self.act(scalars).unsqueeze(1), tensors[:, 1:]], dim=1)


class GateActivation(nn.Module):
    """``l = 0``: ``SiLU(x_0)``; degree ``l > 0``, channel c: ``x_lm * sigmoid(g[l-1, c])``.

    Args:
        lmax, mmax: coefficients kept.
        channels: C; the gates have ``lmax * C`` entries.
        layout: ``"degree"`` (node frame) or ``"order"`` (edge frame).
    """

    def __init__(self, lmax: int, mmax: int | None, channels: int, layout: str = "degree") -> None:
        super().__init__()
        self.lmax, self.channels = int(lmax), int(channels)
        degrees = _degree_of_coefficients(self.lmax, mmax, layout)[1:]
        self.register_buffer("gate_index", torch.tensor([l - 1 for l in degrees], dtype=torch.long), persistent=False)

    def forward(self, gates: Tensor, x: Tensor) -> Tensor:
        """gates [B, lmax * C], x [B, n, C] -> [B, n, C]."""
        g = torch.sigmoid(gates).view(-1, self.lmax, self.channels).index_select(1, self.gate_index)
        return torch.cat([nn.functional.silu(x[:, :1]), x[:, 1:] * g], dim=1)


def _num_gates(activation: str, lmax: int, channels: int) -> int:
    """Invariant inputs an activation needs: C separate scalars (S2) or lmax * C gates."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
    return channels if activation == "s2" else max(lmax, 1) * channels


class S2FeedForward(nn.Module):
    """Equivariant feed-forward network on [N, (lmax+1)^2, C].

    * ``activation="s2"``, ``grid_mlp=True`` (EquiformerV2's OC20 configs): ``h = SO3Linear(x)``; on an S2
      grid ``h -> Linear -> SiLU -> Linear -> SiLU -> Linear`` (no biases, point-wise); project back; the
      ``l = 0`` output is replaced by ``SiLU(Linear(x_0))``; ``SO3Linear``.
    * ``activation="s2"``, ``grid_mlp=False``: ``SO3Linear -> SeparableS2Activation -> SO3Linear``.
    * ``activation="gate"``: ``SO3Linear -> GateActivation -> SO3Linear`` (exactly equivariant).

    Args:
        in_channels, hidden_channels, out_channels: widths.
        lmax: highest degree.
        activation: ``"s2"`` or ``"gate"``.
        grid_mlp: point-wise MLP on the grid instead of a plain SiLU (S2 only).
        grid_resolution: S2 grid size.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        lmax: int,
        activation: str = "s2",
        grid_mlp: bool = True,
        grid_resolution: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.activation = activation
        self.grid_mlp = bool(grid_mlp) and activation == "s2"
        self.lmax = int(lmax)
        num_gates = _num_gates(activation, self.lmax, hidden_channels)
        self.gating_linear = nn.Linear(in_channels, num_gates)
        self.so3_linear_1 = SO3Linear(in_channels, hidden_channels, self.lmax)
        if activation == "gate":
            self.act: nn.Module = GateActivation(self.lmax, self.lmax, hidden_channels)
        elif self.grid_mlp:
            self.grid = S2Grid(self.lmax, self.lmax, grid_resolution)
            self.grid_net = nn.Sequential(
                nn.Linear(hidden_channels, hidden_channels, bias=False),
                nn.SiLU(),
                nn.Linear(hidden_channels, hidden_channels, bias=False),
                nn.SiLU(),
                nn.Linear(hidden_channels, hidden_channels, bias=False),
            )
        else:
            self.act = SeparableS2Activation(self.lmax, self.lmax, grid_resolution)
        self.so3_linear_2 = SO3Linear(hidden_channels, out_channels, self.lmax)

    def forward(self, x: Tensor) -> Tensor:
        """x [N, (lmax+1)^2, C_in] -> [N, (lmax+1)^2, C_out]."""
        gates = self.gating_linear(x[:, 0])
        h = self.so3_linear_1(x)
        if self.grid_mlp:
            h = self.grid.from_grid(self.grid_net(self.grid.to_grid(h)))
            h = torch.cat([nn.functional.silu(gates).unsqueeze(1), h[:, 1:]], dim=1)
        else:
            h = self.act(gates, h)
        return self.so3_linear_2(h)


class GraphDropPath(nn.Module):
    """Stochastic depth: in training, zero a residual update for whole graphs with probability p (rescaled by 1/(1-p))."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        """x [N, ...], batch [N] graph index -> same shape (x itself at eval or p = 0)."""
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = torch.bernoulli(torch.full((num_graphs,), keep, dtype=x.dtype, device=x.device)) / keep
        return x * mask.index_select(0, batch).view((-1,) + (1,) * (x.dim() - 1))

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class _EdgeScalars(nn.Module):
    """Invariant edge features ``[rbf(|r|), emb_src(z_j), emb_dst(z_i)]`` (atom-type embeddings optional)."""

    def __init__(self, num_basis: int, edge_channels: int, max_num_elements: int, use_atom_edge_embedding: bool) -> None:
        super().__init__()
        self.use_atom_edge_embedding = bool(use_atom_edge_embedding)
        self.out_features = int(num_basis)
        if self.use_atom_edge_embedding:
            self.source_embedding = nn.Embedding(max_num_elements, edge_channels)
            self.target_embedding = nn.Embedding(max_num_elements, edge_channels)
            nn.init.uniform_(self.source_embedding.weight, -0.001, 0.001)
            nn.init.uniform_(self.target_embedding.weight, -0.001, 0.001)
            self.out_features += 2 * int(edge_channels)

    def forward(self, rbf: Tensor, z: Tensor, edge_index: Tensor) -> Tensor:
        if not self.use_atom_edge_embedding:
            return rbf
        src = self.source_embedding(z.index_select(0, edge_index[0]))
        dst = self.target_embedding(z.index_select(0, edge_index[1]))
        return torch.cat([rbf, src, dst], dim=1)


class SO2GraphAttention(nn.Module):
    """EquiformerV2's equivariant graph attention built on SO(2) convolutions.

    For an edge j -> i (``r = pos_j - pos_i``, rotated to +y):

    1. ``m_ij = rotate(concat(x_j, x_i))`` truncated to ``|m| <= mmax``;
    2. ``h, a, g = SO2Conv_1(m_ij; rad(rbf, z_j, z_i))`` (``a``: H x A attention features, ``g``: gates);
    3. ``v = SO2Conv_2(act(g, h))`` (separable S2 or gate activation, in the edge frame);
    4. logits ``alpha_h = <w_h, SmoothLeakyReLU(LayerNorm(a_h))>`` (attention re-normalisation);
       softmax over the incoming edges of i per head (soft-masked by cutoff weights if given);
    5. ``out_i = SO3Linear(sum_j rotate_back(alpha_ij v_ij))``.

    Args:
        sphere_channels: C of the node features.
        hidden_channels: channels of the messages between the two SO(2) convolutions.
        num_heads: H.
        alpha_channels: A, attention features per head.
        value_channels: V, value channels per head.
        output_channels: C_out.
        lmax, mmax: degrees, and orders kept in the edge frame.
        num_basis: width of the radial basis input.
        edge_channels: hidden width of the radial MLP and of the atom-type edge embeddings.
        max_num_elements: rows of the atom-type edge embeddings.
        use_atom_edge_embedding: add source/target atom-type embeddings to the radial input.
        activation: ``"s2"`` or ``"gate"``.
        use_attn_renorm: LayerNorm on the attention features (the paper's re-normalisation).
        alpha_drop: dropout on the attention weights (training only).
        grid_resolution: S2 grid size of the edge-frame activation.
    """

    def __init__(
        self,
        sphere_channels: int,
        hidden_channels: int,
        num_heads: int,
        alpha_channels: int,
        value_channels: int,
        output_channels: int,
        lmax: int,
        mmax: int,
        num_basis: int,
        edge_channels: int,
        max_num_elements: int,
        use_atom_edge_embedding: bool = True,
        activation: str = "s2",
        use_attn_renorm: bool = True,
        alpha_drop: float = 0.0,
        grid_resolution: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.lmax, self.mmax = int(lmax), min(int(mmax), int(lmax))
        self.num_heads, self.alpha_channels, self.value_channels = int(num_heads), int(alpha_channels), int(value_channels)
        self.activation = activation
        self.edge_scalars = _EdgeScalars(num_basis, edge_channels, max_num_elements, use_atom_edge_embedding)
        num_gates = _num_gates(activation, self.lmax, hidden_channels)
        self.num_alpha = self.num_heads * self.alpha_channels
        self.so2_conv_1 = SO2Convolution(
            2 * sphere_channels,
            hidden_channels,
            self.lmax,
            self.mmax,
            edge_channels=[self.edge_scalars.out_features, edge_channels, edge_channels],
            extra_m0_channels=self.num_alpha + num_gates,
        )
        self.alpha_norm: nn.Module = nn.LayerNorm(self.alpha_channels) if use_attn_renorm else nn.Identity()
        self.alpha_act = SmoothLeakyReLU(0.2)
        bound = 1.0 / math.sqrt(self.alpha_channels)
        self.alpha_dot = nn.Parameter(torch.empty(self.num_heads, self.alpha_channels).uniform_(-bound, bound))
        self.alpha_dropout = nn.Dropout(alpha_drop) if alpha_drop > 0 else None
        if activation == "s2":
            self.act: nn.Module = SeparableS2Activation(self.lmax, self.mmax, grid_resolution, layout="order")
        else:
            self.act = GateActivation(self.lmax, self.mmax, hidden_channels, layout="order")
        self.so2_conv_2 = SO2Convolution(hidden_channels, self.num_heads * self.value_channels, self.lmax, self.mmax)
        self.proj = SO3Linear(self.num_heads * self.value_channels, output_channels, self.lmax)

    def forward(
        self,
        x: Tensor,
        z: Tensor,
        edge_index: Tensor,
        rbf: Tensor,
        rotation: EdgeRotation,
        edge_weight: Tensor | None = None,
    ) -> Tensor:
        """Attend over incoming edges.

        Args:
            x: [N, (lmax+1)^2, C] node features.
            z: [N] atomic numbers.
            edge_index: [2, E], row 0 = source j, row 1 = target i.
            rbf: [E, num_basis] radial basis of the edge lengths.
            rotation: edge-frame rotations of the E edges.
            edge_weight: optional [E] smooth cutoff weights (soft mask of the softmax).
        Returns:
            [N, (lmax+1)^2, C_out].
        """
        src, dst = edge_index[0], edge_index[1]
        num_nodes, num_edges = x.shape[0], edge_index.shape[1]
        edge_features = self.edge_scalars(rbf, z, edge_index)
        message = torch.cat([x.index_select(0, src), x.index_select(0, dst)], dim=2)
        message = rotation.rotate(message)
        message, extra = self.so2_conv_1(message, edge_features)
        alpha_features, gates = extra[:, : self.num_alpha], extra[:, self.num_alpha :]
        message = self.act(gates, message)
        message, _ = self.so2_conv_2(message)

        a = self.alpha_act(self.alpha_norm(alpha_features.reshape(num_edges, self.num_heads, self.alpha_channels)))
        logits = torch.einsum("eha,ha->eh", a, self.alpha_dot)
        alpha = segment_softmax(logits, dst, num_nodes, weights=edge_weight)
        if self.alpha_dropout is not None:
            alpha = self.alpha_dropout(alpha)
        n = message.shape[1]
        message = message.view(num_edges, n, self.num_heads, self.value_channels) * alpha.view(num_edges, 1, self.num_heads, 1)
        message = rotation.rotate_back(message.reshape(num_edges, n, self.num_heads * self.value_channels))
        return self.proj(segment_sum(message, dst, num_nodes))


class EdgeDegreeEmbedding(nn.Module):
    """EquiformerV2's edge-degree embedding: ``h_i = sum_j w_ij rotate_back(rad(e_ij) at m = 0) / rescale``.

    The radial MLP of the invariant edge features gives ``(lmax+1) x C`` numbers, placed as the ``m = 0``
    coefficients of every degree in the edge frame and rotated back to the node frame.

    Args:
        sphere_channels: C.
        lmax, mmax: layout (mmax only sets the rotate-back rescaling).
        num_basis, edge_channels, max_num_elements, use_atom_edge_embedding: as in :class:`SO2GraphAttention`.
        rescale_factor: the sum is divided by it (EquiformerV2: the average degree).
    """

    def __init__(
        self,
        sphere_channels: int,
        lmax: int,
        num_basis: int,
        edge_channels: int,
        max_num_elements: int,
        use_atom_edge_embedding: bool = True,
        rescale_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.channels, self.lmax = int(sphere_channels), int(lmax)
        self.edge_scalars = _EdgeScalars(num_basis, edge_channels, max_num_elements, use_atom_edge_embedding)
        self.radial = RadialMLP([self.edge_scalars.out_features, edge_channels, edge_channels, (self.lmax + 1) * self.channels])
        self.rescale_factor = float(rescale_factor)

    def forward(
        self,
        z: Tensor,
        edge_index: Tensor,
        rbf: Tensor,
        rotation: EdgeRotation,
        num_nodes: int,
        edge_weight: Tensor | None = None,
    ) -> Tensor:
        """-> [N, (lmax+1)^2, C]."""
        m0 = self.radial(self.edge_scalars(rbf, z, edge_index)).view(-1, self.lmax + 1, self.channels)
        if edge_weight is not None:
            m0 = m0 * edge_weight.view(-1, 1, 1)
        features = rotation.rotate_back_m0(m0)
        return segment_sum(features, edge_index[1], num_nodes) / self.rescale_factor
