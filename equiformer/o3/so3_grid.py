"""Spherical-harmonic coefficients <-> values on a grid of the sphere (for S2 activations).

The grid is a product rule: ``n_lat`` Gauss-Legendre nodes in ``cos(beta)`` (``beta`` measured from the
+y pole, e3nn's polar axis) times ``n_lon`` equally spaced longitudes ``alpha``. Point
``(beta, alpha)`` sits at ``(sin b sin a, cos b, sin b cos a)`` (e3nn's ``angles_to_xyz``).

With component-normalised harmonics (``<Y_lm^2> = 1`` over the sphere) and quadrature weights
``w_p`` (``sum w_p = 4 pi``):

* ``to_grid``: ``f(p) = sum_{lm} c_lm Y_lm(p)``, matrix [P, n];
* ``from_grid``: ``c_lm = sum_p w_p f(p) Y_lm(p) / (4 pi)``, matrix [n, P].

``from_grid(to_grid(c)) = c`` exactly (to round-off) for coefficients with ``l <= lmax`` and
``|m| <= mmax`` whenever ``n_lat >= lmax + 1`` and ``n_lon >= 2 mmax + 1``: the rule integrates
``Y_lm Y_l'm'`` exactly (Legendre degree ``<= 2 lmax`` in ``cos b``, trigonometric degree ``<= 2 mmax``
in ``a``). A pointwise non-linearity on the grid is equivariant only up to the quadrature error of
the non-band-limited result; finer grids reduce it (see EquiformerV2's grid resolution).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from e3nn import o3
from torch import Tensor

from .buffers import ExactConstants
from .wigner import coefficient_index, order_major_coefficients, truncated_coefficients

__all__ = ["S2Grid", "grid_resolution", "s2_grid_points"]


def grid_resolution(lmax: int, mmax: int | None = None, resolution: int | tuple[int, int] | None = None) -> tuple[int, int]:
    """``(n_lat, n_lon)`` from an int (square grid), a pair, or None (default ``2 (lmax + 1)`` each)."""
    mmax = lmax if mmax is None else mmax
    if resolution is None:
        n_lat = n_lon = 2 * (lmax + 1)
    elif isinstance(resolution, int):
        n_lat = n_lon = resolution
    else:
        n_lat, n_lon = (int(r) for r in resolution)
    if n_lat < lmax + 1 or n_lon < 2 * mmax + 1:
        raise ValueError(
            f"S2 grid {n_lat}x{n_lon} is too coarse for lmax={lmax}, mmax={mmax}: need n_lat >= {lmax + 1} "
            f"and n_lon >= {2 * mmax + 1} for an exact round trip"
        )
    return n_lat, n_lon


def s2_grid_points(n_lat: int, n_lon: int) -> tuple[Tensor, Tensor]:
    """Grid points [n_lat * n_lon, 3] (unit vectors, latitude-major) and weights [P] summing to 4 pi; float64 on CPU."""
    nodes, gl_weights = np.polynomial.legendre.leggauss(n_lat)  # nodes = cos(beta) in (-1, 1)
    cos_b = torch.as_tensor(nodes, dtype=torch.float64, device="cpu")
    sin_b = torch.sqrt((1.0 - cos_b) * (1.0 + cos_b))
    alpha = torch.arange(n_lon, dtype=torch.float64, device="cpu") * (2.0 * math.pi / n_lon)
    x = sin_b[:, None] * torch.sin(alpha)[None, :]
    y = cos_b[:, None].expand(n_lat, n_lon)
    z = sin_b[:, None] * torch.cos(alpha)[None, :]
    points = torch.stack([x, y, z], dim=-1).reshape(-1, 3)
    weights = torch.as_tensor(gl_weights, dtype=torch.float64, device="cpu")[:, None].expand(n_lat, n_lon) * (2.0 * math.pi / n_lon)
    return points, weights.reshape(-1)


class S2Grid(ExactConstants):
    """Projection matrices between truncated SH coefficients and a grid on the sphere.

    Coefficients ``l <= lmax``, ``|m| <= mmax`` in one of two layouts (:mod:`equiformer.o3.wigner`):
    ``"degree"``, :func:`truncated_coefficients` (the full ``(lmax+1)^2`` node layout when ``mmax = lmax``),
    or ``"order"``, :func:`order_major_coefficients` (the edge-frame layout of the SO(2) convolutions).

    Args:
        lmax: highest degree.
        mmax: highest order kept (default ``lmax``).
        resolution: ``n`` (an ``n x n`` grid), ``(n_lat, n_lon)``, or None for ``2 (lmax + 1)`` each.
        layout: ``"degree"`` or ``"order"``.

    Attributes:
        to_grid_mat: [P, n] buffer; from_grid_mat: [n, P] buffer; P = n_lat * n_lon.
    """

    def __init__(
        self,
        lmax: int,
        mmax: int | None = None,
        resolution: int | tuple[int, int] | None = None,
        layout: str = "degree",
    ) -> None:
        super().__init__()
        if layout not in ("degree", "order"):
            raise ValueError(f"unknown coefficient layout {layout!r}; choose 'degree' or 'order'")
        self.layout = layout
        self.lmax = int(lmax)
        self.mmax = self.lmax if mmax is None else min(int(mmax), self.lmax)
        self.n_lat, self.n_lon = grid_resolution(self.lmax, self.mmax, resolution)
        with torch.device("cpu"):  # constants live on the CPU, also under a meta-device context
            points, weights = s2_grid_points(self.n_lat, self.n_lon)
            sh = o3.spherical_harmonics(list(range(self.lmax + 1)), points, normalize=False, normalization="component")
        coefficients = (truncated_coefficients if layout == "degree" else order_major_coefficients)(self.lmax, self.mmax)
        index = [coefficient_index(l, m) for l, m in coefficients]
        sh = sh[:, index]  # [P, n]
        self.num_coefficients = len(index)
        self.num_points = points.shape[0]
        self.register_constant("to_grid_mat", sh)
        self.register_constant("from_grid_mat", (sh * weights[:, None]).T / (4.0 * math.pi))

    def to_grid(self, x: Tensor) -> Tensor:
        """Coefficients [..., n, C] -> grid values [..., P, C]."""
        return torch.einsum("pn,...nc->...pc", self.to_grid_mat, x)

    def from_grid(self, g: Tensor) -> Tensor:
        """Grid values [..., P, C] -> coefficients [..., n, C] (quadrature projection)."""
        return torch.einsum("np,...pc->...nc", self.from_grid_mat, g)

    def extra_repr(self) -> str:
        return f"lmax={self.lmax}, mmax={self.mmax}, grid={self.n_lat}x{self.n_lon}, layout={self.layout!r}"
