"""eSCN / EquiformerV2 edge-frame machinery: rotation to the edge frame and SO(2) convolutions.

Rotating an edge's features so that the edge points along the pole (+y, e3nn's polar axis; see
:mod:`equiformer.o3.wigner`) leaves only rotations about the edge as a symmetry. An SO(2)-equivariant
linear map then acts on each order ``m`` separately (Passaro & Zitnick, ICML 2023):

* ``m = 0``: any real linear map of the ``m = 0`` coefficients of all degrees;
* ``m > 0``: the pair ``(x_{+m}, x_{-m})`` of every degree turns like the complex number
  ``x_{+m} + i x_{-m}`` multiplied by ``exp(i m t)``; complex multiplication by learned weights
  ``W_r + i W_i`` commutes with it: ``y_{+m} = W_r x_{+m} - W_i x_{-m}``, ``y_{-m} = W_r x_{-m} + W_i x_{+m}``.

Only orders ``|m| <= mmax`` are kept in the edge frame (m-truncation). Edge-frame features are arrays
[E, n, C] in the order-major layout of :func:`equiformer.o3.wigner.order_major_coefficients`
(``m = 0`` of every degree first, then the ``+m`` and ``-m`` blocks of each order), so that every
order is one contiguous block; index 0 is ``(l, m) = (0, 0)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from equiformer.o3.wigner import WignerD, edge_rotation_matrix, order_major_coefficients

from .radial import RadialMLP

__all__ = ["EdgeRotation", "SO2Convolution"]


class EdgeRotation:
    """Truncated Wigner-D matrices of a batch of edges: rotate node-frame features into edge frames and back.

    Holds one matrix ``D`` [E, n, (lmax+1)^2] per edge: the rows of the block-diagonal Wigner-D with
    ``|m| <= mmax``, ordered order-major. One batched matrix product per rotation is several times
    faster than a loop over degrees (fewer, larger kernels; no slicing), at ``n (lmax+1)^2`` numbers per
    edge (1,421 for lmax 6, mmax 2; fairchem keeps two full ``(lmax+1)^4`` matrices).

    ``rotate``: [E, (lmax+1)^2, C] -> [E, n, C] keeps orders ``|m| <= mmax`` after rotation.
    ``rotate_back``: [E, n, C] -> [E, (lmax+1)^2, C] applies the transposed matrix; with ``rescale`` the
    degrees ``l > mmax`` are multiplied by ``sqrt((2l+1) / (2 mmax + 1))`` (EquiformerV2's
    compensation for the dropped orders).

    Args:
        blocks: ``[D^0, ..., D^lmax]`` with ``D^l`` [E, 2l+1, 2l+1] (e.g. from :class:`WignerD`).
        mmax: highest order kept.
    """

    def __init__(self, blocks: list[Tensor], mmax: int) -> None:
        self.lmax = len(blocks) - 1
        self.mmax = min(int(mmax), self.lmax)
        num_edges, full = blocks[0].shape[0], (self.lmax + 1) ** 2
        coefficients = order_major_coefficients(self.lmax, self.mmax)
        # rows of each order block: for order m (and sign), the rows l + m of D^l for l = |m|..lmax
        parts: list[Tensor] = []
        for m_block in _order_blocks(self.lmax, self.mmax):
            rows = []
            for l, m in m_block:
                row = blocks[l][:, l + m]  # [E, 2l+1]
                left = row.new_zeros(num_edges, l * l)
                right = row.new_zeros(num_edges, full - (l + 1) ** 2)
                rows.append(torch.cat([left, row, right], dim=1))
            parts.append(torch.stack(rows, dim=1))
        self.matrix = torch.cat(parts, dim=1)  # [E, n, (lmax+1)^2]
        self.num_coefficients = len(coefficients)
        scale = [math.sqrt((2 * l + 1) / (2 * self.mmax + 1)) if l > self.mmax else 1.0 for l, _ in coefficients]
        self.rescale = torch.tensor(scale, dtype=self.matrix.dtype, device=self.matrix.device).view(1, -1, 1)

    @classmethod
    def from_edges(cls, edge_vec: Tensor, wigner: WignerD, mmax: int) -> "EdgeRotation":
        """Edge vectors [E, 3] (any length > 0) -> rotations taking each edge to +y."""
        return cls(wigner(edge_rotation_matrix(edge_vec)), mmax)

    def rotate(self, x: Tensor) -> Tensor:
        """x [E, (lmax+1)^2, C] (node frame) -> [E, n, C] (edge frame, truncated, order-major)."""
        return torch.bmm(self.matrix, x)

    def rotate_back(self, y: Tensor, rescale: bool = True) -> Tensor:
        """y [E, n, C] (edge frame) -> [E, (lmax+1)^2, C] (node frame)."""
        if rescale and self.mmax < self.lmax:
            y = y * self.rescale
        return torch.bmm(self.matrix.transpose(1, 2), y)

    def rotate_back_m0(self, y0: Tensor, rescale: bool = True) -> Tensor:
        """Only the ``m = 0`` coefficients y0 [E, lmax+1, C] (one per degree) -> [E, (lmax+1)^2, C]."""
        num_l = self.lmax + 1
        if rescale and self.mmax < self.lmax:
            y0 = y0 * self.rescale[:, :num_l]
        return torch.bmm(self.matrix[:, :num_l].transpose(1, 2), y0)


def _order_blocks(lmax: int, mmax: int) -> list[list[tuple[int, int]]]:
    """Order-major layout split into blocks: [m = 0], [+1], [-1], [+2], [-2], ..."""
    blocks = [[(l, 0) for l in range(lmax + 1)]]
    for m in range(1, min(mmax, lmax) + 1):
        blocks.append([(l, m) for l in range(m, lmax + 1)])
        blocks.append([(l, -m) for l in range(m, lmax + 1)])
    return blocks


class SO2Convolution(nn.Module):
    """SO(2)-equivariant linear map of edge-frame features, optionally modulated by a radial function.

    With ``edge_channels`` the inputs of every order are multiplied element-wise by a radial MLP of the
    invariant edge features before the linear maps (per-edge weights ``W diag(rad(e))``, eSCN/EquiformerV2).
    For ``m > 0`` the complex product is one real matrix product ``[y_+; y_-] = [[W_r, -W_i], [W_i, W_r]] [x_+; x_-]``.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        lmax, mmax: degrees and orders of the truncated edge-frame layout.
        edge_channels: ``[F, hidden...]`` of the radial MLP (its output width is added here); None for
            plain learned weights.
        extra_m0_channels: extra invariant outputs computed from the ``m = 0`` inputs (attention
            features, gates), returned separately.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        lmax: int,
        mmax: int,
        edge_channels: list[int] | None = None,
        extra_m0_channels: int = 0,
    ) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.lmax = int(lmax)
        self.mmax = min(int(mmax), self.lmax)
        self.extra_m0_channels = int(extra_m0_channels)
        self.num_coefficients = len(order_major_coefficients(self.lmax, self.mmax))
        num_l0 = self.lmax + 1
        self.fc_m0 = nn.Linear(num_l0 * self.in_channels, num_l0 * self.out_channels + self.extra_m0_channels)
        self.fc_m = nn.ModuleList()
        self.num_degrees = [num_l0] + [self.lmax - m + 1 for m in range(1, self.mmax + 1)]
        for num_l in self.num_degrees[1:]:
            # rows [W_r; W_i], as a Linear(k C_in -> 2 k C_out) without bias
            fc = nn.Linear(num_l * self.in_channels, 2 * num_l * self.out_channels, bias=False)
            with torch.no_grad():
                fc.weight.mul_(1.0 / math.sqrt(2.0))  # real and imaginary parts add up
            self.fc_m.append(fc)
        self.radial_splits = [k * self.in_channels for k in self.num_degrees]
        self.radial_width = sum(self.radial_splits)
        self.input_splits = [self.num_degrees[0]] + [2 * k for k in self.num_degrees[1:]]
        self.radial = RadialMLP(list(edge_channels) + [self.radial_width]) if edge_channels is not None else None

    def forward(self, x: Tensor, edge_features: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x [E, n, C_in] (order-major), edge_features [E, F] -> ([E, n, C_out], extra [E, X] or None)."""
        num_edges = x.shape[0]
        parts = torch.split(x, self.input_splits, dim=1)
        weights: tuple[Tensor, ...] | None = None
        if self.radial is not None:
            if edge_features is None:
                raise ValueError("SO2Convolution with a radial function needs edge_features")
            weights = torch.split(self.radial(edge_features), self.radial_splits, dim=1)

        x0 = parts[0].reshape(num_edges, -1)
        if weights is not None:
            x0 = x0 * weights[0]
        y0 = self.fc_m0(x0)
        extra = None
        if self.extra_m0_channels:
            extra, y0 = torch.split(y0, [self.extra_m0_channels, y0.shape[1] - self.extra_m0_channels], dim=1)
        out = [y0.reshape(num_edges, -1, self.out_channels)]

        for i, fc in enumerate(self.fc_m, start=1):
            k = self.num_degrees[i]
            xm = parts[i].reshape(num_edges, 2, k * self.in_channels)  # (+m block, -m block)
            if weights is not None:
                xm = xm * weights[i].unsqueeze(1)
            w_r, w_i = torch.split(fc.weight, k * self.out_channels, dim=0)
            w = torch.cat([torch.cat([w_r, -w_i], dim=1), torch.cat([w_i, w_r], dim=1)], dim=0)
            y = torch.mm(xm.reshape(num_edges, 2 * k * self.in_channels), w.t())  # [y_+ | y_-]
            out.append(y.reshape(num_edges, 2 * k, self.out_channels))
        return torch.cat(out, dim=1), extra

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, lmax={self.lmax}, mmax={self.mmax}, "
            f"radial={self.radial is not None}, extra_m0_channels={self.extra_m0_channels}"
        )
