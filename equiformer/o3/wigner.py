"""Wigner-D matrices of real spherical harmonics and the rotation of an edge onto the pole.

Conventions (e3nn's real basis, so features interoperate with :mod:`e3nn.o3` and :mod:`equiformer.nn`):

* coefficients of degree ``l`` occupy ``[l^2, (l+1)^2)``; inside a degree, index ``l + m`` holds order
  ``m = -l..l``; for ``l = 1`` the three components are Cartesian ``(x, y, z)`` and ``D^1(R) = R``;
* the polar axis is **+y**: ``Y^l(+y)`` is non-zero only at ``m = 0``, and a rotation by ``t`` about y
  turns each pair ``(x_{+m}, x_{-m})`` by the angle ``m t`` (the same orientation for every ``l``);
* ``D^l(R)`` satisfies ``Y^l(R v) = D^l(R) Y^l(v)`` and ``D^l(R1 R2) = D^l(R1) D^l(R2)``.

``edge_rotation_matrix`` builds, for each edge vector ``r``, a rotation ``R`` with ``R r / |r| = +y``
from an orthonormal frame in closed form (no angles, no acos/atan2, no random roll). With a fixed
rotation ``Q`` and ``v = Q r / |r|``:

* ``v_y >= 0``: ``R = M(v) Q``, ``M(v)`` the minimal rotation taking ``v`` to +y (Rodrigues, denominator
  ``1 + v_y >= 1``);
* ``v_y < 0``: ``R = M(S v) S Q`` with the half turn ``S = diag(1, -1, -1)`` about x.

Both charts are polynomial in ``v`` divided by a number in ``[1, 2]``: every direction, including
edges along the coordinate axes, exactly antiparallel pairs and nearly parallel ones, is handled to
round-off with finite gradients. Every frame field on the sphere is singular somewhere; here the
roll about the edge jumps across the plane ``r . n = 0`` with ``n = Q^T y`` (:data:`SEAM_NORMAL`).
``Q`` is a fixed generic rotation so that this plane contains no lattice direction of a crystal or
slab: axis-aligned edges (``r_y = 0`` is common in slabs) never sit on the seam, where round-off
could switch charts. Exactly SO(2)-equivariant edge operations do not see the roll at all; the
grid-based S2 activation sees it only at the level of its quadrature error.

``wigner_D_from_matrix`` computes ``D^l`` for all edges at once by the Clebsch-Gordan recursion
``D^l = C_l^T (D^{l-1} (x) D^1) C_l`` with ``D^1 = R`` and ``C_l`` e3nn's (isometric) Wigner-3j of
``(l-1, 1, l)``: polynomial in the entries of ``R``, exact to round-off, differentiable everywhere.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import Tensor

from .buffers import ExactConstants

__all__ = [
    "SEAM_NORMAL",
    "SEAM_ROTATION",
    "WignerD",
    "coefficient_index",
    "edge_rotation_matrix",
    "order_major_coefficients",
    "truncated_coefficients",
    "wigner_D_from_matrix",
]


def coefficient_index(l: int, m: int) -> int:
    """Position of ``(l, m)`` in the full coefficient layout ``[(lmax+1)^2]``."""
    if abs(m) > l:
        raise ValueError(f"order m={m} exceeds degree l={l}")
    return l * l + l + m


def truncated_coefficients(lmax: int, mmax: int) -> list[tuple[int, int]]:
    """``(l, m)`` pairs with ``l <= lmax`` and ``|m| <= min(l, mmax)``, degree-major, ``m`` ascending.

    This is the edge-frame layout of EquiformerV2 (eSCN's m-truncation); for ``mmax >= lmax`` it is the
    full layout of ``(lmax+1)^2`` coefficients.
    """
    if lmax < 0 or mmax < 0:
        raise ValueError(f"lmax and mmax must be >= 0, got lmax={lmax}, mmax={mmax}")
    return [(l, m) for l in range(lmax + 1) for m in range(-min(l, mmax), min(l, mmax) + 1)]


def _axis_angle(axis: tuple[float, float, float], angle: float) -> tuple[tuple[float, ...], ...]:
    """Rotation matrix (python floats, float64-exact) of ``angle`` about ``axis``."""
    norm = math.sqrt(sum(a * a for a in axis))
    x, y, z = (a / norm for a in axis)
    c, s = math.cos(angle), math.sin(angle)
    t = 1.0 - c
    return (
        (c + x * x * t, x * y * t - z * s, x * z * t + y * s),
        (y * x * t + z * s, c + y * y * t, y * z * t - x * s),
        (z * x * t - y * s, z * y * t + x * s, c + z * z * t),
    )


#: fixed generic rotation applied before the two-chart frame (moves the chart seam off lattice planes)
SEAM_ROTATION = _axis_angle((0.5403023058681398, 0.8414709848078965, 1.4142135623730951), 1.0471975511965976 + 0.1)
#: normal n of the seam plane r . n = 0 across which the edge frame's roll jumps (``Q^T y``)
SEAM_NORMAL = SEAM_ROTATION[1]


def order_major_coefficients(lmax: int, mmax: int) -> list[tuple[int, int]]:
    """The same ``(l, m)`` pairs as :func:`truncated_coefficients`, grouped by order (the edge-frame layout).

    ``(l, 0)`` for ``l = 0..lmax``; then for each ``m = 1..mmax``: ``(l, +m)`` for ``l = m..lmax``, followed
    by ``(l, -m)`` for ``l = m..lmax``. Each order is then a contiguous block, as SO(2) convolutions need.
    """
    if lmax < 0 or mmax < 0:
        raise ValueError(f"lmax and mmax must be >= 0, got lmax={lmax}, mmax={mmax}")
    out = [(l, 0) for l in range(lmax + 1)]
    for m in range(1, min(mmax, lmax) + 1):
        out += [(l, m) for l in range(m, lmax + 1)]
        out += [(l, -m) for l in range(m, lmax + 1)]
    return out


def edge_rotation_matrix(edge_vec: Tensor) -> Tensor:
    """Rotations ``R`` [E, 3, 3] with ``R @ (r / |r|) = (0, 1, 0)`` for each edge vector ``r`` [E, 3].

    Closed form from an orthonormal frame (see module docstring); ``det R = +1``, deterministic,
    differentiable. Edges must have non-zero length (a zero vector gives NaN: no direction).
    """
    if edge_vec.dim() != 2 or edge_vec.shape[-1] != 3:
        raise ValueError(f"edge_vec must have shape [E, 3], got {tuple(edge_vec.shape)}")
    u = edge_vec / torch.linalg.vector_norm(edge_vec, dim=-1, keepdim=True)
    Q = SEAM_ROTATION
    vx, vy, vz = (u[:, 0] * Q[i][0] + u[:, 1] * Q[i][1] + u[:, 2] * Q[i][2] for i in range(3))
    # chart: s = +1 for v_y >= 0, -1 otherwise; S = diag(1, s, s) maps v to the upper hemisphere
    s = torch.where(vy >= 0, torch.ones_like(vy), -torch.ones_like(vy)).detach()
    vy, vz = s * vy, s * vz
    c = vy  # cos of the angle to +y, in [0, 1]
    k = 1.0 / (1.0 + c)  # in [1/2, 1]
    # minimal rotation M taking (vx, vy, vz) to +y: M = c I + [w]x + w w^T / (1 + c), w = v x y = (-vz, 0, vx)
    m02 = -vx * vz * k
    F = (  # F = M S: columns 1 and 2 times s
        (c + vz * vz * k, -vx * s, m02 * s),
        (vx, c * s, vz * s),
        (m02, -vz * s, (c + vx * vx * k) * s),
    )
    # R = F Q
    rows = [
        torch.stack([F[i][0] * Q[0][j] + F[i][1] * Q[1][j] + F[i][2] * Q[2][j] for j in range(3)], dim=-1)
        for i in range(3)
    ]
    return torch.stack(rows, dim=-2)


def _cg_isometry(l: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``C_l`` [2l-1, 3, 2l+1] with ``C^T C = I``: e3nn's ``wigner_3j(l-1, 1, l) * sqrt(2l+1)``."""
    with torch.device("cpu"):  # constants live on the CPU, also under a meta-device context
        return o3.wigner_3j(l - 1, 1, l, dtype=torch.float64).mul(math.sqrt(2 * l + 1)).to(dtype)


def _recursion_step(D_prev: Tensor, R: Tensor, C: Tensor) -> Tensor:
    """``D^l[a, b] = sum C[i, j, a] D^{l-1}[i, k] R[j, n] C[k, n, b]`` for a batch [E, ...]."""
    # V[e, j, k, b] = sum_n R[e, j, n] C[k, n, b]
    V = torch.einsum("ejn,knb->ejkb", R, C)
    # U[e, i, j, b] = sum_k D_prev[e, i, k] V[e, j, k, b]
    U = torch.einsum("eik,ejkb->eijb", D_prev, V)
    # D[e, a, b] = sum_{i, j} C[i, j, a] U[e, i, j, b]
    return torch.einsum("ija,eijb->eab", C, U)


def wigner_D_from_matrix(R: Tensor, lmax: int) -> list[Tensor]:
    """Wigner-D blocks ``[D^0, ..., D^lmax]`` of rotations ``R`` [E, 3, 3]; ``D^l`` has shape [E, 2l+1, 2l+1].

    e3nn's real basis (see module docstring): ``D^1 = R``. Exact for any ``lmax`` (cost grows as l^4).
    """
    if R.dim() != 3 or R.shape[-2:] != (3, 3):
        raise ValueError(f"R must have shape [E, 3, 3], got {tuple(R.shape)}")
    blocks = [R.new_ones(R.shape[0], 1, 1)]
    if lmax >= 1:
        blocks.append(R)
    for l in range(2, lmax + 1):
        C = _cg_isometry(l).to(device=R.device, dtype=R.dtype)
        blocks.append(_recursion_step(blocks[-1], R, C))
    return blocks


class WignerD(ExactConstants):
    """Module form of :func:`wigner_D_from_matrix` holding the Clebsch-Gordan constants as buffers.

    Args:
        lmax: highest degree.
    """

    def __init__(self, lmax: int) -> None:
        super().__init__()
        if lmax < 0:
            raise ValueError(f"lmax must be >= 0, got {lmax}")
        self.lmax = int(lmax)
        for l in range(2, self.lmax + 1):
            self.register_constant(f"cg_{l}", _cg_isometry(l))

    def forward(self, R: Tensor) -> list[Tensor]:
        """R [E, 3, 3] -> ``[D^0, ..., D^lmax]``, ``D^l`` [E, 2l+1, 2l+1]."""
        blocks = [R.new_ones(R.shape[0], 1, 1)]
        if self.lmax >= 1:
            blocks.append(R)
        for l in range(2, self.lmax + 1):
            blocks.append(_recursion_step(blocks[-1], R, getattr(self, f"cg_{l}")))
        return blocks

    def extra_repr(self) -> str:
        return f"lmax={self.lmax}"
