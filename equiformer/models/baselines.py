"""Baselines for the n-body benchmark and the GATr speed benchmark.

- :class:`TransformerEncoder`: a plain pre-LN transformer on ``[..., N, D]`` tokens with
  attention on ``torch.nn.functional.scaled_dot_product_attention`` (the width/depth-matched
  reference for GATr in ``benchmarks/bench_gatr.py``).
- :class:`NBodyTransformer`: the paper's non-geometric baseline: the raw 7 numbers of each
  body (mass, position, velocity) -> linear -> transformer -> linear -> final position. Not
  equivariant (it reads absolute coordinates), by design.
- :class:`EGNN` / :class:`NBodyEGNN`: E(n)-equivariant graph network (Satorras, Hoogeboom &
  Welling, ICML 2021), written from the paper, with its velocity variant (Eq. 7) on the
  fully connected graph of the bodies.

All n-body models take a flat batch ``data`` (``mass [N, 1]``, ``pos [N, 3]``, ``vel [N, 3]``,
sorted ``batch [N]``; :func:`equiformer.datasets.nbody.nbody_batch`) and return
``{"pos": [N, 3] final positions, "displacement": [N, 3]}``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from equiformer.ga.net import from_padded, to_padded
from equiformer.models.gatr_nbody import nbody_inputs

__all__ = ["TransformerBlock", "TransformerEncoder", "NBodyTransformer", "EGNNLayer", "EGNN", "NBodyEGNN"]


class TransformerBlock(nn.Module):
    """``x + MHA(LN(x))`` then ``x + MLP(LN(x))`` on ``[..., N, D]``; ``mask [..., N]`` marks real tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(round(mlp_ratio * dim))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        lead, n, d = x.shape[:-2], x.shape[-2], x.shape[-1]
        h = self.num_heads
        q, k, v = self.qkv(self.norm1(x)).reshape(-1, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask.reshape(-1, 1, 1, n).to(torch.bool)
        drop = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        a = a.transpose(1, 2).reshape(*lead, n, d)
        x = x + F.dropout(self.proj(a), drop, self.training)
        return x + F.dropout(self.mlp(self.norm2(x)), drop, self.training)


class TransformerEncoder(nn.Module):
    """``in_channels -> dim`` linear, ``num_blocks`` :class:`TransformerBlock`, (LN), ``-> out_channels``.

    ``forward(x [..., N, in_channels], mask [..., N] | None) -> [..., N, out_channels]``.
    ``final_norm`` adds the usual pre-LN output norm; without it (the GATr paper's baseline)
    the residual stream is linear in the input, so the identity map is easy to represent.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dim: int = 384,
        num_blocks: int = 10,
        num_heads: int = 8,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        final_norm: bool = True,
    ) -> None:
        super().__init__()
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, dim=dim, num_blocks=num_blocks,
            num_heads=num_heads, mlp_ratio=mlp_ratio, dropout=dropout, final_norm=final_norm,
        )
        self.linear_in = nn.Linear(in_channels, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads, mlp_ratio, dropout) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(dim) if final_norm else nn.Identity()
        self.linear_out = nn.Linear(dim, out_channels)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.linear_in(x)
        for block in self.blocks:
            h = block(h, mask)
        return self.linear_out(self.norm(h))


class NBodyTransformer(nn.Module):
    """The paper's Transformer baseline on raw per-body features ``(m, x, v)`` (7 numbers).

    Args:
        dim, num_blocks, num_heads, mlp_ratio, dropout: transformer size (paper: 384, 10, 8, 2).
        residual: predict the displacement and add the initial position (False, as in the
            paper: the network outputs the final positions directly).
        final_norm: layer norm before the output layer (False, as in the paper's baseline).
    """

    def __init__(
        self,
        dim: int = 384,
        num_blocks: int = 10,
        num_heads: int = 8,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        residual: bool = False,
        final_norm: bool = False,
    ) -> None:
        super().__init__()
        self.config = dict(dim=dim, num_blocks=num_blocks, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           dropout=dropout, residual=residual, final_norm=final_norm)
        self.residual = residual
        self.net = TransformerEncoder(7, 3, dim, num_blocks, num_heads, mlp_ratio, dropout, final_norm)

    def forward(self, data) -> dict[str, Tensor]:
        mass, pos, vel, batch = nbody_inputs(data)
        x, mask = to_padded(torch.cat([mass, pos, vel], -1), batch, getattr(data, "num_graphs", None))
        out = from_padded(self.net(x, mask), mask)
        pred = pos + out if self.residual else out
        return {"pos": pred, "displacement": pred - pos}


def _mlp(sizes: list[int], act_last: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or act_last:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class EGNNLayer(nn.Module):
    """One E(n)-equivariant convolution layer (Satorras et al. 2021, Eqs. 3-7).

    ``m_ij = phi_e(h_i, h_j, |x_i - x_j|^2, a_ij)``;
    ``v_i <- phi_v(h_i) v_i + C sum_j (x_i - x_j) phi_x(m_ij)``, ``x_i <- x_i + v_i`` (velocity variant);
    ``h_i <- h_i + phi_h(h_i, sum_j m_ij)``. ``C = 1 / (num neighbours)`` here (the paper's
    ``1/(M-1)`` on a fully connected graph). Without velocities the update is
    ``x_i <- x_i + C sum_j (x_i - x_j) phi_x(m_ij)`` (Eq. 4).

    ``forward(h [N, H], x [N, 3], v [N, 3] | None, edge_index [2, E] (row 0 = j source, row 1 = i target),
    edge_attr [E, A]) -> (h, x, v)``.
    """

    def __init__(self, hidden: int, edge_attr_dim: int = 0, velocity: bool = True, tanh: bool = False,
                 coords_range: float = 1.0) -> None:
        super().__init__()
        self.phi_e = _mlp([2 * hidden + 1 + edge_attr_dim, hidden, hidden], act_last=True)
        self.phi_x = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1, bias=False))
        nn.init.xavier_uniform_(self.phi_x[-1].weight, gain=0.001)  # small coordinate updates at start
        self.phi_h = _mlp([2 * hidden, hidden, hidden])
        self.phi_v = _mlp([hidden, hidden, 1]) if velocity else None
        if self.phi_v is not None:  # start near "no motion": the velocity scale is learned
            nn.init.xavier_uniform_(self.phi_v[-1].weight, gain=0.001)
            nn.init.zeros_(self.phi_v[-1].bias)
        self.tanh, self.coords_range = tanh, coords_range

    def forward(self, h: Tensor, x: Tensor, v: Tensor | None, edge_index: Tensor, edge_attr: Tensor | None = None):
        j, i = edge_index
        diff = x[i] - x[j]  # x_i - x_j  [E, 3]
        d2 = (diff * diff).sum(-1, keepdim=True)
        feats = [h[i], h[j], d2] + ([edge_attr] if edge_attr is not None else [])
        m = self.phi_e(torch.cat(feats, -1))  # [E, H]
        w = self.phi_x(m)
        if self.tanh:
            w = torch.tanh(w) * self.coords_range
        n = x.shape[0]
        count = torch.zeros(n, 1, dtype=x.dtype, device=x.device).index_add_(0, i, torch.ones_like(d2))
        shift = torch.zeros_like(x).index_add_(0, i, diff * w) / count.clamp_min(1.0)
        if self.phi_v is not None and v is not None:
            v = self.phi_v(h) * v + shift
            x = x + v
        else:
            x = x + shift
        agg = torch.zeros_like(h).index_add_(0, i, m)
        h = h + self.phi_h(torch.cat([h, agg], -1))
        return h, x, v


class EGNN(nn.Module):
    """Stack of :class:`EGNNLayer` with an input embedding of the invariant node features.

    ``forward(node_feats [N, F], x [N, 3], v [N, 3] | None, edge_index, edge_attr) -> (h [N, H], x [N, 3])``.
    """

    def __init__(self, in_node: int, hidden: int = 64, num_layers: int = 4, edge_attr_dim: int = 0,
                 velocity: bool = True, tanh: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(in_node, hidden)
        self.layers = nn.ModuleList(
            EGNNLayer(hidden, edge_attr_dim, velocity=velocity, tanh=tanh) for _ in range(num_layers)
        )

    def forward(self, node_feats: Tensor, x: Tensor, v: Tensor | None, edge_index: Tensor,
                edge_attr: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self.embed(node_feats)
        for layer in self.layers:
            h, x, v = layer(h, x, v, edge_index, edge_attr)
        return h, x


def full_edge_index(batch: Tensor) -> Tensor:
    """All ordered pairs ``(j, i)``, ``j != i``, within each graph of a sorted ``batch [N]``: ``[2, E]``.

    Memory is linear in the number of edges (no ``N x N`` mask over the whole batch).
    """
    n = batch.shape[0]
    if n == 0:
        return batch.new_zeros(2, 0)
    counts = torch.bincount(batch)
    ptr = torch.cumsum(counts, 0) - counts  # first node of each graph
    deg = counts[batch]  # nodes in each node's graph (self included)
    i = torch.repeat_interleave(torch.arange(n, device=batch.device), deg)
    start = torch.repeat_interleave(torch.cumsum(deg, 0) - deg, deg)
    j = ptr[batch[i]] + (torch.arange(i.shape[0], device=batch.device) - start)
    keep = j != i
    return torch.stack([j[keep], i[keep]])


class NBodyEGNN(nn.Module):
    """EGNN on the n-body task, set up as in the EGNN paper's n-body experiment.

    Node features: mass and speed ``|v|`` (invariants); edge attribute: ``m_i m_j``; fully
    connected graph within each system; coordinates enter only through ``x_i - x_j`` and the
    velocity through ``phi_v(h_i) v_i``, so the prediction (the last layer's ``x``) is E(3)-
    and permutation-equivariant. Paper sizes: 4 layers of 64 features.
    """

    def __init__(self, hidden: int = 64, num_layers: int = 4, tanh: bool = False) -> None:
        super().__init__()
        self.config = dict(hidden=hidden, num_layers=num_layers, tanh=tanh)
        self.net = EGNN(2, hidden, num_layers, edge_attr_dim=1, velocity=True, tanh=tanh)

    def forward(self, data) -> dict[str, Tensor]:
        mass, pos, vel, batch = nbody_inputs(data)
        edge_index = full_edge_index(batch)
        j, i = edge_index
        edge_attr = mass[i] * mass[j]
        feats = torch.cat([mass, vel.norm(dim=-1, keepdim=True)], -1)
        _, x = self.net(feats, pos, vel, edge_index, edge_attr)
        return {"pos": x, "displacement": x - pos}
