"""GATr blocks and the GATr network on sets of multivectors.

Shapes: ``mv [..., N, C, 16]`` (``N`` items, ``C`` channels), ``s [..., N, S]``, optional
``mask [..., N]`` (True for real items; padding from variable-size sets). For a PyG-style
flat batch use :func:`to_padded` / :func:`from_padded` or :meth:`GATr.forward_flat`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from equiformer.ga.attention import SelfAttention
from equiformer.ga.layers import EquiLayerNorm, EquiLinear, GeometricBilinear, GradeDropout, ScalarGatedGELU

__all__ = ["GATrBlock", "GATr", "AxialGATr", "reference_multivector", "to_padded", "from_padded"]


def reference_multivector(mv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``mv [..., N, C, 16]`` over items (real ones only, given ``mask [..., N]``) and channels: ``[..., 16]``.

    Equivariant, so its e123 component can fix the sign of the join under reflections.
    """
    per_item = mv.mean(-2)  # [..., N, 16]
    if mask is None:
        return per_item.mean(-2)
    w = mask.to(mv.dtype).unsqueeze(-1)
    return (per_item * w).sum(-2) / w.sum(-2).clamp_min(1.0)


def to_padded(x: torch.Tensor, batch: torch.Tensor, num_graphs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat per-item tensor ``x [N_total, *F]`` with a sorted PyG ``batch [N_total]`` -> (``[B, N_max, *F]``, mask ``[B, N_max]``)."""
    from torch_geometric.utils import to_dense_batch

    return to_dense_batch(x, batch, batch_size=num_graphs)


def from_padded(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_padded`: ``[B, N_max, *F]`` and mask ``[B, N_max]`` -> ``[N_total, *F]``."""
    return x[mask]


class GATrBlock(nn.Module):
    """``LN -> attention -> residual -> LN -> geometric MLP -> residual`` on ``(mv [..., N, C, 16], s [..., N, S])``.

    The MLP is ``GeometricBilinear -> ScalarGatedGELU -> EquiLinear``; dropout is grade-wise.
    """

    def __init__(
        self,
        mv_channels: int,
        s_channels: int,
        num_heads: int = 4,
        head_mv: int = 8,
        head_s: int = 16,
        mlp_mv: int | None = None,
        mlp_s: int | None = None,
        distance: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        mlp_mv = mlp_mv or 2 * mv_channels
        mlp_s = mlp_s if mlp_s is not None else 2 * s_channels
        self.norm1 = EquiLayerNorm()
        self.attn = SelfAttention(mv_channels, s_channels, num_heads, head_mv, head_s, distance=distance, dropout=dropout)
        self.norm2 = EquiLayerNorm()
        self.bilinear = GeometricBilinear(mv_channels, mlp_mv, s_channels, mlp_s, hidden_mv=2 * (mlp_mv // 2 or 1))
        self.gelu = ScalarGatedGELU()
        self.mlp_out = EquiLinear(mlp_mv, mv_channels, mlp_s, s_channels)
        self.drop = GradeDropout(dropout)

    def forward(
        self,
        mv: torch.Tensor,
        s: torch.Tensor,
        reference: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``reference [..., 16]`` broadcasts against ``mv[..., :, 0, :]`` (e.g. shape ``[..., 1, 16]``)."""
        h_mv, h_s = self.attn(*self.norm1(mv, s), mask=mask)
        h_mv, h_s = self.drop(h_mv, h_s)
        mv, s = mv + h_mv, s + h_s
        h_mv, h_s = self.bilinear(*self.norm2(mv, s), reference=reference)
        h_mv, h_s = self.mlp_out(*self.gelu(h_mv, h_s))
        h_mv, h_s = self.drop(h_mv, h_s)
        return mv + h_mv, s + h_s


class GATr(nn.Module):
    """Geometric Algebra Transformer (Brehmer et al., NeurIPS 2023): E(3)-equivariant on sets.

    ``forward(mv [..., N, in_mv, 16], s [..., N, in_s] | None, mask [..., N] | None,
    reference [..., 16] | None) -> (mv [..., N, out_mv, 16], s [..., N, out_s])``.
    The reference multivector for the equivariant join defaults to the mean of the input
    multivectors over (real) items and channels. Padded items' outputs are zero.
    Constructor arguments are JSON-serialisable and kept in ``self.config``.
    """

    def __init__(
        self,
        in_mv_channels: int,
        out_mv_channels: int,
        hidden_mv_channels: int = 16,
        in_s_channels: int = 0,
        out_s_channels: int = 0,
        hidden_s_channels: int = 32,
        num_blocks: int = 4,
        num_heads: int = 4,
        head_mv_channels: int | None = None,
        head_s_channels: int | None = None,
        distance_attention: bool = True,
        dropout: float = 0.0,
        checkpoint_blocks: bool = False,
    ) -> None:
        super().__init__()
        self.config = dict(
            in_mv_channels=in_mv_channels, out_mv_channels=out_mv_channels, hidden_mv_channels=hidden_mv_channels,
            in_s_channels=in_s_channels, out_s_channels=out_s_channels, hidden_s_channels=hidden_s_channels,
            num_blocks=num_blocks, num_heads=num_heads, head_mv_channels=head_mv_channels,
            head_s_channels=head_s_channels, distance_attention=distance_attention, dropout=dropout,
            checkpoint_blocks=checkpoint_blocks,
        )
        head_mv = head_mv_channels or max(1, hidden_mv_channels // num_heads)
        head_s = head_s_channels if head_s_channels is not None else max(1, hidden_s_channels // num_heads)
        self.in_s_channels = in_s_channels
        self.checkpoint_blocks = checkpoint_blocks
        self.linear_in = EquiLinear(in_mv_channels, hidden_mv_channels, in_s_channels, hidden_s_channels)
        self.blocks = nn.ModuleList(
            GATrBlock(hidden_mv_channels, hidden_s_channels, num_heads, head_mv, head_s,
                      distance=distance_attention, dropout=dropout)
            for _ in range(num_blocks)
        )
        self.linear_out = EquiLinear(hidden_mv_channels, out_mv_channels, hidden_s_channels, out_s_channels)

    def _check(self, mv: torch.Tensor, s: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        cin = self.config["in_mv_channels"]
        if mv.dim() < 3 or mv.shape[-2:] != (cin, 16):
            raise ValueError(f"GATr expects multivectors [..., N, {cin}, 16], got {tuple(mv.shape)}")
        if s is None:
            if self.in_s_channels:
                raise ValueError(f"GATr was built with in_s_channels={self.in_s_channels}; pass scalars [..., N, {self.in_s_channels}]")
            s = mv.new_zeros(*mv.shape[:-2], 0)
        if s.shape != (*mv.shape[:-2], self.in_s_channels):
            raise ValueError(f"GATr expects scalars {(*mv.shape[:-2], self.in_s_channels)}, got {tuple(s.shape)}")
        if mask is not None and mask.shape != mv.shape[:-2]:
            raise ValueError(f"mask must have shape {tuple(mv.shape[:-2])}, got {tuple(mask.shape)}")
        return s

    def forward(
        self,
        mv: torch.Tensor,
        s: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._check(mv, s, mask)
        if reference is None:
            reference = reference_multivector(mv, mask)
        ref = reference.unsqueeze(-2)  # broadcast over items; GeometricBilinear adds the channel axis
        h_mv, h_s = self.linear_in(mv, s)
        for block in self.blocks:
            if self.checkpoint_blocks and self.training:
                h_mv, h_s = checkpoint(block, h_mv, h_s, ref, mask, use_reentrant=False)
            else:
                h_mv, h_s = block(h_mv, h_s, reference=ref, mask=mask)
        out_mv, out_s = self.linear_out(h_mv, h_s)
        if mask is not None:
            keep = mask.to(out_mv.dtype)
            out_mv, out_s = out_mv * keep[..., None, None], out_s * keep[..., None]
        return out_mv, out_s

    def forward_flat(
        self, mv: torch.Tensor, s: torch.Tensor | None, batch: torch.Tensor, num_graphs: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PyG-style input: ``mv [N_total, C, 16]``, ``s [N_total, S]``, sorted ``batch [N_total]`` -> flat outputs."""
        p_mv, mask = to_padded(mv, batch, num_graphs)
        p_s = None if s is None else to_padded(s, batch, num_graphs)[0]
        o_mv, o_s = self.forward(p_mv, p_s, mask=mask)
        return from_padded(o_mv, mask), from_padded(o_s, mask)


class AxialGATr(GATr):
    """GATr on a 2D grid of items ``mv [..., N1, N2, C, 16]``: blocks alternate attention over
    axis N2 (even blocks) and axis N1 (odd blocks). No padding masks; the reference is the
    mean over both item axes and channels."""

    def forward(
        self,
        mv: torch.Tensor,
        s: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is not None:
            raise ValueError("AxialGATr does not support masks")
        if mv.dim() < 4:
            raise ValueError(f"AxialGATr expects multivectors [..., N1, N2, C, 16], got {tuple(mv.shape)}")
        s = self._check(mv, s, None)
        if reference is None:
            reference = mv.mean(dim=(-4, -3, -2))
        ref = reference[..., None, None, :]
        h_mv, h_s = self.linear_in(mv, s)
        for i, block in enumerate(self.blocks):
            if i % 2:
                h_mv, h_s = h_mv.transpose(-3, -4), h_s.transpose(-2, -3)
            h_mv, h_s = block(h_mv, h_s, reference=ref)
            if i % 2:
                h_mv, h_s = h_mv.transpose(-3, -4), h_s.transpose(-2, -3)
        return self.linear_out(h_mv, h_s)
