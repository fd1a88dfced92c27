"""G(3,0,1) algebra of equiformer.ga against the independent `clifford` package and matrix algebra."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from equiformer.ga import (
    BLADE_NAMES,
    blade_index,
    dual,
    embed_direction,
    embed_plane,
    embed_point,
    embed_pseudoscalar,
    embed_reflection,
    embed_rotation,
    embed_scalar,
    embed_translation,
    extract_direction,
    extract_plane,
    extract_point,
    extract_pseudoscalar,
    extract_scalar,
    geometric_product,
    grade_involution,
    grade_project,
    inner_product,
    join,
    outer_product,
    quaternion_to_matrix,
    random_e3,
    reverse,
    sandwich,
    undual,
    versor_inverse,
)
from equiformer.ga.transforms import KINDS

clifford = pytest.importorskip("clifford")
from clifford.pga import layout as PGA  # noqa: E402

DT = torch.float64


# --- explicit map between clifford's PGA basis and ours ---------------------------------


def _clifford_map() -> tuple[np.ndarray, np.ndarray]:
    """perm, sign with ours[k] = sign[k] * cliff[perm[k]] for the same multivector.

    clifford names blades by generator tuples (its e0 is the null vector, sig [0,1,1,1]);
    a tuple that is not ascending is a signed permutation of our ascending blade.
    """
    assert list(PGA.sig) == [0, 1, 1, 1]
    perm = np.zeros(16, dtype=int)
    sign = np.zeros(16)
    for ci, tup in enumerate(PGA.bladeTupList):
        ordered = tuple(sorted(tup))
        name = "1" if not ordered else "e" + "".join(map(str, ordered))
        k = blade_index(name)
        inversions = sum(1 for a in range(len(tup)) for b in range(a + 1, len(tup)) if tup[a] > tup[b])
        perm[k], sign[k] = ci, (-1) ** inversions
    assert sorted(perm.tolist()) == list(range(16))
    return perm, sign


PERM, SIGN = _clifford_map()


def to_cliff(x: torch.Tensor):
    v = np.zeros(16)
    v[PERM] = SIGN * x.detach().numpy()
    return PGA.MultiVector(value=v)


def from_cliff(m) -> torch.Tensor:
    return torch.as_tensor(SIGN * np.asarray(m.value, dtype=float)[PERM], dtype=DT)


def basis(k: int) -> torch.Tensor:
    e = torch.zeros(16, dtype=DT)
    e[k] = 1.0
    return e


def test_blade_order_matches_design_and_clifford():
    assert BLADE_NAMES == (
        "1", "e0", "e1", "e2", "e3", "e01", "e02", "e03",
        "e12", "e13", "e23", "e012", "e013", "e023", "e123", "e0123",
    )
    # clifford's PGA layout happens to use the same ascending tuples in the same order
    assert PERM.tolist() == list(range(16)) and (SIGN == 1).all()
    x = torch.randn(16, dtype=DT)
    assert torch.equal(from_cliff(to_cliff(x)), x)


def test_generator_squares():
    e = [basis(i) for i in (1, 2, 3, 4)]
    assert torch.equal(geometric_product(e[0], e[0]), torch.zeros(16, dtype=DT))
    for v in e[1:]:
        assert torch.equal(geometric_product(v, v), basis(0))
    # anticommuting generators, e0 e1 = e01
    assert torch.equal(geometric_product(e[1], e[0]), -basis(5))
    assert torch.equal(geometric_product(e[0], e[1]), basis(5))


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (geometric_product, lambda a, b: a * b),
        (outer_product, lambda a, b: a ^ b),
        (join, lambda a, b: a & b),
    ],
    ids=["geometric", "outer", "join"],
)
def test_products_on_all_basis_pairs(ours, theirs):
    eye = torch.eye(16, dtype=DT)
    got = ours(eye[:, None, :], eye[None, :, :])  # [16, 16, 16] by broadcasting
    for i in range(16):
        for j in range(16):
            want = from_cliff(theirs(to_cliff(eye[i]), to_cliff(eye[j])))
            assert torch.equal(got[i, j], want), (BLADE_NAMES[i], BLADE_NAMES[j], got[i, j], want)


def test_products_on_random_multivectors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 16, dtype=DT, generator=g)
    y = torch.randn(20, 16, dtype=DT, generator=g)
    gp, op, jn = geometric_product(x, y), outer_product(x, y), join(x, y)
    ip = inner_product(x, y)
    for n in range(20):
        a, b = to_cliff(x[n]), to_cliff(y[n])
        torch.testing.assert_close(gp[n], from_cliff(a * b), rtol=0, atol=1e-12)
        torch.testing.assert_close(op[n], from_cliff(a ^ b), rtol=0, atol=1e-12)
        torch.testing.assert_close(jn[n], from_cliff(a & b), rtol=0, atol=1e-12)
        torch.testing.assert_close(ip[n], torch.tensor((~a * b).value[0], dtype=DT), rtol=0, atol=1e-12)
        torch.testing.assert_close(reverse(x[n]), from_cliff(~a), rtol=0, atol=0)
        torch.testing.assert_close(grade_involution(x[n]), from_cliff(a.gradeInvol()), rtol=0, atol=0)
        torch.testing.assert_close(dual(x[n]), from_cliff(a.dual()), rtol=0, atol=0)
        for k in range(5):
            torch.testing.assert_close(grade_project(x[n], k), from_cliff(a(k)), rtol=0, atol=0)


def test_dual_undual_and_products_identities():
    g = torch.Generator().manual_seed(1)
    x, y, z = torch.randn(3, 8, 16, dtype=DT, generator=g)
    torch.testing.assert_close(undual(dual(x)), x, rtol=0, atol=0)
    torch.testing.assert_close(dual(undual(x)), x, rtol=0, atol=0)
    # dual of the scalar is the pseudoscalar, e_A ^ dual(e_A) = e0123 for every blade
    eye = torch.eye(16, dtype=DT)
    torch.testing.assert_close(outer_product(eye, dual(eye)), eye[15].expand(16, 16), rtol=0, atol=0)
    # associativity and the inner product as <~x y>_0
    torch.testing.assert_close(
        geometric_product(geometric_product(x, y), z), geometric_product(x, geometric_product(y, z)),
        rtol=0, atol=1e-12,
    )
    torch.testing.assert_close(inner_product(x, y), geometric_product(reverse(x), y)[..., 0], rtol=0, atol=1e-12)
    # grade projections add up to the identity
    torch.testing.assert_close(sum(grade_project(x, k) for k in range(5)), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="grade"):
        grade_project(x, 5)
    with pytest.raises(ValueError, match=r"\[\.\.\., 16\]"):
        geometric_product(x[..., :15], y)


def test_sandwich_matches_clifford():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 16, dtype=DT, generator=g)
    for kind in KINDS:
        u, _, _ = random_e3(kind, (6,), generator=g)
        out = sandwich(u, x)
        for n in range(6):
            U, X = to_cliff(u[n]), to_cliff(x[n])
            odd = kind in ("reflection", "e3_odd")
            want = U * (X.gradeInvol() if odd else X) * ~U / (U * ~U).value[0]
            torch.testing.assert_close(out[n], from_cliff(want), rtol=0, atol=1e-11)
        parity = "odd" if kind in ("reflection", "e3_odd") else "even"
        torch.testing.assert_close(sandwich(u, x, parity=parity), out, rtol=0, atol=0)
        torch.testing.assert_close(geometric_product(u, versor_inverse(u)), basis(0).expand(6, 16), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_products_commute_with_group_action(kind):
    """GP, OP and grade projections are equivariant, the inner product invariant; the join
    is equivariant for proper motions, flips sign under reflections, and is equivariant with
    a reference multivector."""
    g = torch.Generator().manual_seed(3)
    x, y, ref = torch.randn(3, 10, 16, dtype=DT, generator=g)
    u, _, _ = random_e3(kind, (10,), generator=g)
    act = lambda m: sandwich(u, m)  # noqa: E731
    tol = dict(rtol=0, atol=1e-10)
    torch.testing.assert_close(geometric_product(act(x), act(y)), act(geometric_product(x, y)), **tol)
    torch.testing.assert_close(outer_product(act(x), act(y)), act(outer_product(x, y)), **tol)
    torch.testing.assert_close(inner_product(act(x), act(y)), inner_product(x, y), **tol)
    for k in range(5):
        torch.testing.assert_close(grade_project(act(x), k), act(grade_project(x, k)), **tol)
    torch.testing.assert_close(reverse(act(x)), act(reverse(x)), **tol)
    det = -1.0 if kind in ("reflection", "e3_odd") else 1.0
    torch.testing.assert_close(join(act(x), act(y)), det * act(join(x, y)), **tol)
    torch.testing.assert_close(join(act(x), act(y), act(ref)), act(join(x, y, ref)), **tol)


# --- embeddings ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_versors_act_on_points_like_matrices(kind):
    g = torch.Generator().manual_seed(4)
    p = torch.randn(7, 3, dtype=DT, generator=g) * 3
    u, r, t = random_e3(kind, (7,), generator=g)
    assert torch.allclose(r @ r.transpose(-1, -2), torch.eye(3, dtype=DT).expand(7, 3, 3), atol=1e-12)
    want = torch.einsum("nij,nj->ni", r, p) + t
    torch.testing.assert_close(extract_point(sandwich(u, embed_point(p))), want, rtol=0, atol=1e-12)
    # directions: translation-invariant, rotate with R, sign-flipped (homogeneous) under odd maps
    det = torch.det(r)[:, None]
    got_dir = extract_direction(sandwich(u, embed_direction(p)))
    torch.testing.assert_close(got_dir, det * torch.einsum("nij,nj->ni", r, p), rtol=0, atol=1e-12)
    # planes n.x + d = 0 map to planes (R n).x + d - (R n).t = 0, orientation kept
    n = torch.randn(7, 3, dtype=DT, generator=g)
    d = torch.randn(7, 1, dtype=DT, generator=g)
    n2, d2 = extract_plane(sandwich(u, embed_plane(n, d)))
    rn = torch.einsum("nij,nj->ni", r, n)
    torch.testing.assert_close(n2, rn, rtol=0, atol=1e-12)
    torch.testing.assert_close(d2, d - (rn * t).sum(-1, keepdim=True), rtol=0, atol=1e-12)


def test_rotation_translation_reflection_conventions_by_hand():
    p = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    # quarter turn about z: x -> y, y -> -x (right hand), q = (cos 45deg, 0, 0, sin 45deg)
    c = np.cos(np.pi / 4)
    q = torch.tensor([c, 0.0, 0.0, c], dtype=DT)
    torch.testing.assert_close(extract_point(sandwich(embed_rotation(q), embed_point(p))),
                               torch.tensor([-2.0, 1.0, 3.0], dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close(quaternion_to_matrix(q) @ p, torch.tensor([-2.0, 1.0, 3.0], dtype=DT),
                               rtol=0, atol=1e-12)
    t = torch.tensor([10.0, -20.0, 0.5], dtype=DT)
    torch.testing.assert_close(extract_point(sandwich(embed_translation(t), embed_point(p))), p + t,
                               rtol=0, atol=1e-12)
    # reflection in the plane x = 2 (n = e1, offset -2): Householder about that plane
    refl = embed_reflection(torch.tensor([1.0, 0.0, 0.0], dtype=DT), -2.0)
    out = sandwich(refl, embed_point(p))
    assert out[14] == -1.0  # homogeneous weight flips under an odd versor
    torch.testing.assert_close(extract_point(out), torch.tensor([3.0, 2.0, 3.0], dtype=DT), rtol=0, atol=1e-12)
    # Householder with a non-unit normal
    n = torch.tensor([1.0, 2.0, -2.0], dtype=DT)
    d = 0.7
    h = p - 2 * (n @ p + d) * n / (n @ n)
    torch.testing.assert_close(extract_point(sandwich(embed_reflection(n, d), embed_point(p))), h,
                               rtol=0, atol=1e-12)


def test_quaternion_matrix_is_rotation_and_composition_is_hamilton_product():
    g = torch.Generator().manual_seed(5)
    q1, q2 = torch.randn(2, 5, 4, dtype=DT, generator=g)
    r1, r2 = quaternion_to_matrix(q1), quaternion_to_matrix(q2)
    torch.testing.assert_close(torch.det(r1), torch.ones(5, dtype=DT), rtol=0, atol=1e-12)
    # Hamilton product q1 q2 <-> R1 R2 <-> rotor product
    w1, x1, y1, z1 = (q1 / q1.norm(dim=-1, keepdim=True)).unbind(-1)
    w2, x2, y2, z2 = (q2 / q2.norm(dim=-1, keepdim=True)).unbind(-1)
    q12 = torch.stack([
        w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
        w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
        w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
        w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
    ], -1)
    torch.testing.assert_close(quaternion_to_matrix(q12), r1 @ r2, rtol=0, atol=1e-12)
    rotor = geometric_product(embed_rotation(q1), embed_rotation(q2))
    n1, n2 = q1.norm(dim=-1, keepdim=True), q2.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(rotor, embed_rotation(q12) * n1 * n2, rtol=0, atol=1e-12)


def test_embed_extract_roundtrips():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(4, 2, 1, dtype=DT, generator=g)
    v = torch.randn(4, 2, 3, dtype=DT, generator=g)
    assert torch.equal(extract_scalar(embed_scalar(s)), s)
    assert torch.equal(extract_pseudoscalar(embed_pseudoscalar(s)), s)
    torch.testing.assert_close(extract_point(embed_point(v)), v, rtol=0, atol=0)
    torch.testing.assert_close(extract_point(3.0 * embed_point(v)), v, rtol=0, atol=1e-15)
    torch.testing.assert_close(extract_direction(embed_direction(v)), v, rtol=0, atol=0)
    n, d = extract_plane(embed_plane(v, s))
    assert torch.equal(n, v) and torch.equal(d, s)
    assert embed_point(v).shape == (4, 2, 16)
    with pytest.raises(ValueError, match="points"):
        embed_point(torch.zeros(4, 2))


def test_join_and_meet_build_lines_and_planes():
    """join of 3 points = the plane through them; meet (outer product) of 3 planes = their point."""
    g = torch.Generator().manual_seed(7)
    p1, p2, p3 = torch.randn(3, 5, 3, dtype=DT, generator=g)
    P1, P2, P3 = embed_point(p1), embed_point(p2), embed_point(p3)
    line = join(P1, P2)
    assert torch.allclose(grade_project(line, 2), line)
    # a point on the line through p1, p2 joins it to zero; p3 does not
    mid = embed_point(0.3 * p1 + 0.7 * p2)
    torch.testing.assert_close(join(line, mid), torch.zeros(5, 16, dtype=DT), rtol=0, atol=1e-12)
    plane = join(line, P3)
    assert torch.allclose(grade_project(plane, 1), plane)
    n, d = extract_plane(plane)
    cross = torch.linalg.cross(p2 - p1, p3 - p1)
    cos = (n * cross).sum(-1) / (n.norm(dim=-1) * cross.norm(dim=-1))
    torch.testing.assert_close(cos.abs(), torch.ones(5, dtype=DT), rtol=0, atol=1e-12)
    for p in (p1, p2, p3):
        torch.testing.assert_close((n * p).sum(-1, keepdim=True) + d, torch.zeros(5, 1, dtype=DT),
                                   rtol=0, atol=1e-12)
    # meet: three planes n_k . x + d_k = 0 intersect in the solution of N x = -d
    normals = torch.randn(5, 3, 3, dtype=DT, generator=g)
    offsets = torch.randn(5, 3, 1, dtype=DT, generator=g)
    planes = embed_plane(normals, offsets)
    point = outer_product(outer_product(planes[:, 0], planes[:, 1]), planes[:, 2])
    want = torch.linalg.solve(normals, -offsets).squeeze(-1)
    torch.testing.assert_close(extract_point(point), want, rtol=0, atol=1e-10)


def test_float32_and_broadcasting():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 1, 16, generator=g)
    y = torch.randn(1, 4, 16, generator=g)
    out = geometric_product(x, y)
    assert out.shape == (3, 4, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out, geometric_product(x.double(), y.double()).float(), rtol=1e-5, atol=1e-5)
