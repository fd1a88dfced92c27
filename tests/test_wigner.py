"""Wigner-D matrices, the edge-to-pole rotation and the S2 grid of :mod:`equiformer.o3` (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from e3nn import o3

from equiformer.o3.so3_grid import S2Grid, grid_resolution, s2_grid_points
from equiformer.o3.wigner import (
    SEAM_NORMAL,
    WignerD,
    coefficient_index,
    edge_rotation_matrix,
    order_major_coefficients,
    truncated_coefficients,
    wigner_D_from_matrix,
)

F64 = torch.float64
Y_AXIS = torch.tensor([0.0, 1.0, 0.0], dtype=F64)


def rotations(n: int, seed: int) -> torch.Tensor:
    """n Haar-random rotations [n, 3, 3] in float64 (QR of Gaussian matrices, det fixed to +1)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=gen, dtype=F64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q * torch.sign(torch.linalg.det(q)).view(-1, 1, 1)


def sh(l: int, v: torch.Tensor) -> torch.Tensor:
    return o3.spherical_harmonics(l, v, normalize=False, normalization="component")


def _e3nn_wigner(l: int, R: torch.Tensor) -> torch.Tensor:
    """e3nn's own D (via Euler angles); its generators follow the default dtype, so use float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        return torch.stack([o3.Irrep(l, 1).D_from_matrix(r) for r in R])
    finally:
        torch.set_default_dtype(previous)


# ------------------------------------------------------------------------------------- Wigner-D


@pytest.mark.parametrize("lmax", [6, 8])
def test_wigner_is_orthogonal_and_a_homomorphism(lmax):
    R1, R2 = rotations(16, 0), rotations(16, 1)
    D1, D2, D12 = (wigner_D_from_matrix(R, lmax) for R in (R1, R2, R1 @ R2))
    for l in range(lmax + 1):
        eye = torch.eye(2 * l + 1, dtype=F64)
        assert (D1[l] @ D1[l].transpose(1, 2) - eye).abs().max() < 1e-13, l
        assert (torch.linalg.det(D1[l]) - 1).abs().max() < 1e-12, l
        assert (D12[l] - D1[l] @ D2[l]).abs().max() < 1e-13, l
        inverse = wigner_D_from_matrix(R1.transpose(1, 2), lmax)[l]
        assert (inverse - D1[l].transpose(1, 2)).abs().max() < 1e-13, l


def test_wigner_rotates_spherical_harmonics_and_matches_e3nn():
    """The defining property Y(R v) = D(R) Y(v), and agreement with e3nn's angle-based D."""
    R = rotations(8, 2)
    v = torch.randn(8, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    D = wigner_D_from_matrix(R, 6)
    assert torch.equal(D[1], R)  # e3nn's l = 1 basis is Cartesian (x, y, z)
    for l in range(7):
        lhs = sh(l, torch.einsum("eij,ej->ei", R, v))
        rhs = torch.einsum("eij,ej->ei", D[l], sh(l, v))
        assert (lhs - rhs).abs().max() < 1e-12 * max(1.0, rhs.abs().max().item()), l
        reference = _e3nn_wigner(l, R)
        assert (D[l] - reference).abs().max() < 1e-11, l


def test_wigner_module_is_exact_after_dtype_round_trip():
    """Constants survive float32 -> float64 casts exactly (a float64 master copy is kept)."""
    module = WignerD(6).float().double()
    R = rotations(4, 4)
    for got, want in zip(module(R), wigner_D_from_matrix(R, 6)):
        assert (got - want).abs().max() < 1e-14
    assert module.cg_6.dtype == F64


def test_rotation_about_the_pole_turns_each_order_by_m_t():
    """Convention the SO(2) convolutions rely on: (x_{+m}, x_{-m}) turns by m*t, same sense for every l."""
    t = 0.37
    Ry = o3.matrix_y(torch.tensor(t, dtype=F64)).unsqueeze(0)
    D = wigner_D_from_matrix(Ry, 5)
    for l in range(1, 6):
        for m in range(1, l + 1):
            block = D[l][0][[l + m, l - m]][:, [l + m, l - m]]
            c, s = math.cos(m * t), math.sin(m * t)
            assert torch.allclose(block, torch.tensor([[c, -s], [s, c]], dtype=F64), atol=1e-14), (l, m)


# ------------------------------------------------------------------------ edge -> pole rotation


def _edge_cases() -> torch.Tensor:
    """Edges along +-x, +-y, +-z, the seam normal, 1e-12 off the axes and the seam, and random ones."""
    gen = torch.Generator().manual_seed(5)
    n = torch.tensor(SEAM_NORMAL, dtype=F64)
    t = torch.linalg.cross(n, torch.tensor([0.0, 0.0, 1.0], dtype=F64))
    t = t / t.norm()
    axes = torch.cat([torch.eye(3, dtype=F64), -torch.eye(3, dtype=F64)])
    tiny = 1e-12
    near = [
        torch.tensor([tiny, 1.0, -tiny], dtype=F64),
        torch.tensor([tiny, -1.0, tiny], dtype=F64),
        torch.tensor([tiny, 0.0, 1.0], dtype=F64),
        torch.tensor([-tiny, tiny, -1.0], dtype=F64),
        torch.tensor([1e-300, -1.0, 0.0], dtype=F64),
        n,
        -n,
        n + tiny * t,
        -n + tiny * t,
        t + tiny * n,  # on either side of the seam plane
        t - tiny * n,
        3.7 * t,
    ]
    scale = 0.5 + 4 * torch.rand(12, 1, generator=gen, dtype=F64)
    random = torch.randn(12, 3, generator=gen, dtype=F64) * scale
    return torch.cat([axes * 2.5, torch.stack(near), random])


def test_edge_rotation_takes_every_edge_exactly_to_the_pole():
    vec = _edge_cases()
    R = edge_rotation_matrix(vec)
    u = vec / vec.norm(dim=1, keepdim=True)
    rotated = torch.einsum("eij,ej->ei", R, u)
    assert (rotated - Y_AXIS).abs().max() < 1e-15  # off-axis components at round-off, also 1e-12 off +-y/+-z
    assert (R @ R.transpose(1, 2) - torch.eye(3, dtype=F64)).abs().max() < 4e-15
    assert (torch.linalg.det(R) - 1).abs().max() < 4e-15
    # the harmonics of the edge become pure m = 0 after the Wigner rotation
    D = wigner_D_from_matrix(R, 6)
    for l in range(7):
        in_frame = torch.einsum("eij,ej->ei", D[l], sh(l, u))
        expected = sh(l, Y_AXIS.expand_as(u))
        assert (in_frame - expected).abs().max() < 1e-12 * (2 * l + 1), l


def test_edge_rotation_is_deterministic_and_rotates_with_the_edge():
    """No random roll: same edge, same frame. A rotated edge gets a frame differing only by a turn about +y."""
    vec = _edge_cases()
    assert torch.equal(edge_rotation_matrix(vec), edge_rotation_matrix(vec.clone()))
    Rg = rotations(1, 6)[0]
    R, R_rot = edge_rotation_matrix(vec), edge_rotation_matrix(vec @ Rg.T)
    about_y = R_rot @ Rg @ R.transpose(1, 2)  # maps +y to +y: a rotation about the pole
    assert (about_y[:, :, 1] - Y_AXIS).abs().max() < 1e-14
    assert (about_y[:, 1, :] - Y_AXIS).abs().max() < 1e-14


def test_edge_rotation_gradients_are_finite_at_the_poles_and_the_seam():
    vec = _edge_cases().requires_grad_(True)
    D = wigner_D_from_matrix(edge_rotation_matrix(vec), 4)
    loss = sum((d * torch.linspace(-1, 1, d[0].numel(), dtype=F64).view(d[0].shape)).sum() for d in D)
    (grad,) = torch.autograd.grad(loss, vec)
    assert torch.isfinite(grad).all()
    # gradient of a frame-independent quantity (harmonics of the edge itself) through the frame is exact:
    # d/dr [D(R(r))^T Y(+y)] = d/dr Y(r/|r|)
    vec2 = vec.detach()[6:].clone().requires_grad_(True)
    R = edge_rotation_matrix(vec2)
    back = torch.einsum("eji,j->ei", wigner_D_from_matrix(R, 3)[3], sh(3, Y_AXIS))
    (g1,) = torch.autograd.grad(back.pow(3).sum(), vec2)
    vec3 = vec.detach()[6:].clone().requires_grad_(True)
    direct = o3.spherical_harmonics(3, vec3, normalize=True, normalization="component")
    (g2,) = torch.autograd.grad(direct.pow(3).sum(), vec3)
    assert (g1 - g2).abs().max() < 1e-9 * g2.abs().max().clamp_min(1.0)


def test_edge_rotation_float32_is_accurate():
    vec = _edge_cases().float()
    R = edge_rotation_matrix(vec)
    rotated = torch.einsum("eij,ej->ei", R, vec / vec.norm(dim=1, keepdim=True))
    assert (rotated - Y_AXIS.float()).abs().max() < 1e-6
    assert torch.isfinite(R).all()


def test_edge_rotation_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[E, 3\]"):
        edge_rotation_matrix(torch.zeros(4, 2))


def test_coefficient_layouts():
    assert truncated_coefficients(2, 2) == [(l, m) for l in range(3) for m in range(-l, l + 1)]
    trunc = truncated_coefficients(6, 2)
    assert len(trunc) == 1 + 3 + 5 * 5 and (6, 3) not in trunc and (6, -2) in trunc
    assert [coefficient_index(l, m) for l, m in truncated_coefficients(3, 3)] == list(range(16))
    order = order_major_coefficients(3, 2)
    assert sorted(order) == sorted(truncated_coefficients(3, 2))
    assert order[:6] == [(0, 0), (1, 0), (2, 0), (3, 0), (1, 1), (2, 1)] and order[-2:] == [(2, -2), (3, -2)]
    with pytest.raises(ValueError):
        coefficient_index(1, 2)


# -------------------------------------------------------------------------------------- S2 grid


def test_grid_quadrature_weights_and_points():
    points, weights = s2_grid_points(9, 13)
    assert points.shape == (117, 3)
    assert abs(weights.sum().item() - 4 * math.pi) < 1e-12
    assert (points.norm(dim=1) - 1).abs().max() < 1e-15
    # exact for polynomials of degree <= 2 n_lat - 1 in y and trig degree < n_lon: <y^2> = 1/3, <x^2 z^2> = 1/15
    mean = lambda f: (weights * f).sum() / (4 * math.pi)
    assert abs(mean(points[:, 1] ** 2) - 1 / 3) < 1e-14
    assert abs(mean(points[:, 0] ** 2 * points[:, 2] ** 2) - 1 / 15) < 1e-14


@pytest.mark.parametrize("lmax,mmax,resolution", [(6, 2, None), (6, 6, 18), (4, 2, (5, 5)), (3, 1, (4, 3)), (6, 3, (7, 7))])
def test_grid_round_trip_is_exact_for_band_limited_functions(lmax, mmax, resolution):
    grid = S2Grid(lmax, mmax, resolution).double()
    coeffs = torch.randn(5, grid.num_coefficients, 3, generator=torch.Generator().manual_seed(lmax), dtype=F64)
    assert (grid.from_grid(grid.to_grid(coeffs)) - coeffs).abs().max() < 1e-12
    # the edge-frame (order-major) layout is a permutation of the same coefficients: same grid values
    by_order = S2Grid(lmax, mmax, resolution, layout="order").double()
    perm = [truncated_coefficients(lmax, mmax).index(lm) for lm in order_major_coefficients(lmax, mmax)]
    assert (by_order.to_grid(coeffs[:, perm]) - grid.to_grid(coeffs)).abs().max() < 1e-12
    assert (by_order.from_grid(by_order.to_grid(coeffs[:, perm])) - coeffs[:, perm]).abs().max() < 1e-12


def test_grid_values_are_the_function_and_rotate_with_wigner_d():
    """to_grid(D(R) c) at p equals to_grid(c) at R^T p: the grid and Wigner-D use the same basis."""
    lmax = 4
    grid = S2Grid(lmax, lmax, 10).double()
    points, _ = s2_grid_points(grid.n_lat, grid.n_lon)
    coeffs = torch.randn((lmax + 1) ** 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    R = rotations(1, 8)
    D = torch.block_diag(*[d[0] for d in wigner_D_from_matrix(R, lmax)])
    values = grid.to_grid((D @ coeffs).view(1, -1, 1)).view(-1)
    direct = o3.spherical_harmonics(list(range(lmax + 1)), points @ R[0], normalize=False, normalization="component") @ coeffs
    assert (values - direct).abs().max() < 1e-12


def test_projection_of_a_non_band_limited_function_converges():
    """Projection of exp(x) (all degrees) onto l <= 4 converges to the exact coefficients as the grid grows."""
    lmax = 4
    fine = S2Grid(lmax, lmax, 40).double()
    exact = fine.from_grid(torch.exp(s2_grid_points(40, 40)[0][:, :1]).unsqueeze(0))
    errors = []
    for n in (10, 14, 20):
        g = S2Grid(lmax, lmax, n).double()
        errors.append((g.from_grid(torch.exp(s2_grid_points(n, n)[0][:, :1]).unsqueeze(0)) - exact).abs().max().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-10, errors


def test_grid_too_coarse_is_an_error():
    with pytest.raises(ValueError, match="too coarse"):
        grid_resolution(6, 2, (6, 18))
    with pytest.raises(ValueError, match="too coarse"):
        S2Grid(4, 4, (8, 8))
    assert grid_resolution(6, 2) == (14, 14) and grid_resolution(6, 3, 18) == (18, 18)
