"""Point cloud in, multivectors out: a GATr encoder for registration and docking tasks.

``GATrPointEncoder(points [B, N, 3], normals [B, N, 3] | None, features [B, N, F] | None,
mask [B, N] | None) -> (mv [B, N, C, 16], s [B, N, S])``.

Input channels per point: the point (trivector, channel 0) and, with normals, the oriented
plane through the point with that normal (a vector, channel 1). Invariant per-point
features become scalar channels (a constant 1 when there are none).

Symmetry. The output transforms with the versor sandwich when the input cloud is moved
by a rotation and/or translation (SE(3), exactly). PGA points are *oriented*: a reflection
maps the embedded point ``e(p)`` to ``-e(Hp)`` (its e123 weight, a pseudoscalar, flips).
So a mirrored cloud is exactly equivariant when it is passed with ``orientation=-1``
(the e123 weight of its embedded points), i.e. ``f(Hp, Hn, orientation=-1) = u f(p, n) u^-1``.
With ``symmetrize_orientation=True`` the encoder averages over both weights and becomes
E(3)-equivariant for unoriented clouds, at twice the cost. Chiral tasks (proteins,
registration of rigid scans) want SE(3), the default.
"""

from __future__ import annotations

import torch
from torch import nn

from equiformer.ga.embedding import embed_plane, embed_point, extract_point
from equiformer.ga.net import GATr

__all__ = ["GATrPointEncoder"]


class GATrPointEncoder(nn.Module):
    """GATr over the points of a cloud; see the module docstring for inputs and symmetry."""

    def __init__(
        self,
        out_mv_channels: int = 8,
        out_s_channels: int = 16,
        hidden_mv_channels: int = 16,
        hidden_s_channels: int = 32,
        num_blocks: int = 2,
        num_heads: int = 4,
        in_features: int = 0,
        use_normals: bool = False,
        distance_attention: bool = True,
        dropout: float = 0.0,
        symmetrize_orientation: bool = False,
    ) -> None:
        super().__init__()
        self.config = dict(
            out_mv_channels=out_mv_channels, out_s_channels=out_s_channels,
            hidden_mv_channels=hidden_mv_channels, hidden_s_channels=hidden_s_channels,
            num_blocks=num_blocks, num_heads=num_heads, in_features=in_features, use_normals=use_normals,
            distance_attention=distance_attention, dropout=dropout, symmetrize_orientation=symmetrize_orientation,
        )
        self.in_features, self.use_normals = in_features, use_normals
        self.symmetrize_orientation = symmetrize_orientation
        self.net = GATr(
            in_mv_channels=2 if use_normals else 1, out_mv_channels=out_mv_channels,
            hidden_mv_channels=hidden_mv_channels, in_s_channels=max(in_features, 1),
            out_s_channels=out_s_channels, hidden_s_channels=hidden_s_channels, num_blocks=num_blocks,
            num_heads=num_heads, distance_attention=distance_attention, dropout=dropout,
        )

    def embed(
        self,
        points: torch.Tensor,
        normals: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        orientation: float | torch.Tensor = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(points ``[..., N, 3]``, normals, features) -> (mv ``[..., N, 1 or 2, 16]``, s ``[..., N, max(F, 1)]``).

        ``orientation``: e123 weight of the embedded points, ``+1`` or ``-1`` (float, or a
        tensor broadcastable to ``[..., N]``, e.g. ``[B, 1]``).
        """
        if points.shape[-1:] != (3,) or points.dim() < 2:
            raise ValueError(f"points must have shape [..., N, 3], got {tuple(points.shape)}")
        if not torch.is_tensor(orientation):
            orientation = torch.tensor(float(orientation), dtype=points.dtype, device=points.device)
        chans = [embed_point(points) * orientation.to(points.dtype).unsqueeze(-1)]
        if self.use_normals:
            if normals is None or normals.shape != points.shape:
                raise ValueError(f"this encoder uses normals: pass normals of shape {tuple(points.shape)}")
            offset = -(normals * points).sum(-1, keepdim=True)
            chans.append(embed_plane(normals, offset))
        elif normals is not None:
            raise ValueError("normals given but the encoder was built with use_normals=False")
        mv = torch.stack(chans, dim=-2)
        if self.in_features:
            if features is None or features.shape != (*points.shape[:-1], self.in_features):
                raise ValueError(f"features must have shape {(*points.shape[:-1], self.in_features)}")
            s = features.to(points.dtype)
        else:
            if features is not None:
                raise ValueError("features given but the encoder was built with in_features=0")
            s = points.new_ones(*points.shape[:-1], 1)
        return mv, s

    def forward(
        self,
        points: torch.Tensor,
        normals: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        orientation: float | torch.Tensor = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mv, s = self.embed(points, normals, features, orientation)
        out = self.net(mv, s, mask=mask)
        if not self.symmetrize_orientation:
            return out
        flipped = torch.cat([-mv[..., :1, :], mv[..., 1:, :]], dim=-2)
        out2 = self.net(flipped, s, mask=mask)
        return 0.5 * (out[0] + out2[0]), 0.5 * (out[1] + out2[1])

    @staticmethod
    def extract_points(mv: torch.Tensor, channel: int = 0) -> torch.Tensor:
        """Points ``[..., N, 3]`` from the trivector part of output channel ``channel`` (divided by its e123 weight)."""
        return extract_point(mv[..., channel, :])
