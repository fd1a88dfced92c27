"""GATr for n-body prediction (the GATr paper's n-body experiment, Brehmer et al. 2023, Sec. 5.1).

``GATrNBody()(data) -> {"pos": [N, 3], "displacement": [N, 3]}`` for a flat batch ``data``
with ``mass [N, 1]`` (or ``[N]``), ``pos [N, 3]`` and ``vel [N, 3]`` initial state and a sorted
``batch [N]`` (see :func:`equiformer.datasets.nbody.nbody_batch`). ``pos`` is the predicted
position of every body after the simulated time; ``displacement = pos - data.pos``.

Embedding (as in the paper): one multivector channel per body holding the mass as a scalar,
the position as a point (trivector ``e123 - x e023 + y e013 - z e012``) and the velocity as
the bivector of a translation (``-v_i e0i / 2``), summed (an equivariant linear layer
separates the grades again); the mass is also the one auxiliary scalar channel.
Readout: the initial point plus GATr's output multivector, read as a point (divided by its
e123 weight). The output layer starts at zero, so the untrained model predicts "no motion".

Symmetry. Translations act on the e0 parts of the point; the velocity bivector is
translation-invariant and rotates (and reflects) like a vector; the predicted positions are
therefore exactly SE(3)-equivariant. PGA points are oriented (a reflection maps the point
``e(p)`` to ``-e(Hp)``), so under a reflection the embedded input is not the reflected
embedding. With ``symmetrize_orientation=True`` the model runs the network on both point
orientations (e123 weight +1 and -1) and averages the two predicted positions: then it is
E(3)-equivariant (reflections included), at twice the cost.

GATr's method may be subject to Qualcomm's patent application US 20240383132; this code is
written from the paper.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from equiformer.ga.embedding import embed_point, embed_scalar, embed_translation, extract_point
from equiformer.ga.net import GATr, from_padded, to_padded

__all__ = ["GATrNBody", "nbody_inputs"]


def nbody_inputs(data) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(mass [N, 1], pos [N, 3], vel [N, 3], batch [N])`` of an n-body batch, checked."""
    for key in ("mass", "pos", "vel"):
        if getattr(data, key, None) is None:
            raise ValueError(f"n-body models need data.{key}; got fields {sorted(data.keys())}")
    pos, vel, mass = data.pos, data.vel, data.mass
    if mass.dim() == 1:
        mass = mass.unsqueeze(-1)
    n = pos.shape[0]
    if pos.shape != (n, 3) or vel.shape != (n, 3) or mass.shape != (n, 1):
        raise ValueError(
            f"n-body batch needs pos [N,3], vel [N,3], mass [N,1]; got {tuple(pos.shape)}, {tuple(vel.shape)}, {tuple(mass.shape)}"
        )
    batch = getattr(data, "batch", None)
    if batch is None:
        batch = torch.zeros(n, dtype=torch.long, device=pos.device)
    return mass.to(pos.dtype), pos, vel.to(pos.dtype), batch


class GATrNBody(nn.Module):
    """GATr wrapper for n-body prediction (see the module docstring).

    Args:
        hidden_mv_channels, hidden_s_channels, num_blocks, num_heads: GATr size (paper: 16, 128, 10, 8).
        head_mv_channels, head_s_channels: per-head channels (GATr's defaults when None).
        distance_attention: GATr's distance-aware attention term.
        dropout: grade-wise dropout inside the blocks.
        symmetrize_orientation: average over both point orientations (E(3) instead of SE(3)).
        checkpoint_blocks: activation checkpointing of the GATr blocks.
    """

    def __init__(
        self,
        hidden_mv_channels: int = 16,
        hidden_s_channels: int = 128,
        num_blocks: int = 10,
        num_heads: int = 8,
        head_mv_channels: int | None = None,
        head_s_channels: int | None = None,
        distance_attention: bool = True,
        dropout: float = 0.0,
        symmetrize_orientation: bool = False,
        checkpoint_blocks: bool = False,
    ) -> None:
        super().__init__()
        self.config = dict(
            hidden_mv_channels=hidden_mv_channels, hidden_s_channels=hidden_s_channels, num_blocks=num_blocks,
            num_heads=num_heads, head_mv_channels=head_mv_channels, head_s_channels=head_s_channels,
            distance_attention=distance_attention, dropout=dropout,
            symmetrize_orientation=symmetrize_orientation, checkpoint_blocks=checkpoint_blocks,
        )
        self.symmetrize_orientation = symmetrize_orientation
        self.net = GATr(
            in_mv_channels=1, out_mv_channels=1, hidden_mv_channels=hidden_mv_channels,
            in_s_channels=1, out_s_channels=1, hidden_s_channels=hidden_s_channels,
            num_blocks=num_blocks, num_heads=num_heads, head_mv_channels=head_mv_channels,
            head_s_channels=head_s_channels, distance_attention=distance_attention, dropout=dropout,
            checkpoint_blocks=checkpoint_blocks,
        )
        with torch.no_grad():  # "no motion" at initialisation
            for p in self.net.linear_out.parameters():
                p.zero_()

    @staticmethod
    def embed(mass: Tensor, pos: Tensor, vel: Tensor, orientation: float = 1.0) -> Tensor:
        """One multivector per body ``[..., 16]``: mass scalar + point (weight ``orientation``) + velocity bivector."""
        velocity = embed_translation(vel) - embed_scalar(torch.ones_like(mass))  # -v_i e0i / 2
        return embed_scalar(mass) + orientation * embed_point(pos) + velocity

    def _predict(self, mass: Tensor, pos: Tensor, vel: Tensor, mask: Tensor, orientation: float) -> Tensor:
        point = orientation * embed_point(pos)  # [B, N, 16]
        mv = self.embed(mass, pos, vel, orientation).unsqueeze(-2)  # [B, N, 1, 16]
        out_mv, _ = self.net(mv, mass, mask=mask)
        return extract_point(out_mv[..., 0, :] + point)  # [B, N, 3]

    def forward(self, data) -> dict[str, Tensor]:
        mass, pos, vel, batch = nbody_inputs(data)
        num_graphs = getattr(data, "num_graphs", None)
        p_mass, mask = to_padded(mass, batch, num_graphs)
        p_pos = to_padded(pos, batch, num_graphs)[0]
        p_vel = to_padded(vel, batch, num_graphs)[0]
        pred = self._predict(p_mass, p_pos, p_vel, mask, 1.0)
        if self.symmetrize_orientation:
            pred = 0.5 * (pred + self._predict(p_mass, p_pos, p_vel, mask, -1.0))
        out = from_padded(pred, mask)
        return {"pos": out, "displacement": out - pos}
