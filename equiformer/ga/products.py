"""Operations of G(3,0,1) on multivector tensors ``[..., 16]`` (any float dtype, any device).

Bilinear products broadcast their leading dimensions like ``x * y``. They contract the
outer product ``x_i y_j`` (``[..., 256]``) against a dense ``[256, 16]`` table: one GEMM,
which is the fast path on GPUs (the tables are mostly zeros, but a 256x16 GEMM per
multivector is cheaper than a gather on accelerators).

Conventions are those of :mod:`equiformer.ga.algebra` (blade order, dual = right complement).
"""

from __future__ import annotations

import torch

from equiformer.ga.algebra import table

__all__ = [
    "geometric_product",
    "outer_product",
    "join",
    "inner_product",
    "norm",
    "reverse",
    "grade_involution",
    "dual",
    "undual",
    "grade_project",
    "versor_inverse",
    "sandwich",
]


def _check(x: torch.Tensor, name: str = "x") -> None:
    if x.shape[-1:] != (16,):
        raise ValueError(f"{name} must be a multivector tensor [..., 16], got shape {tuple(x.shape)}")


def _bilinear(x: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
    _check(x, "x")
    _check(y, "y")
    dtype = torch.promote_types(x.dtype, y.dtype)
    t = table(name, x.device, dtype).reshape(256, 16)
    outer = (x.to(dtype).unsqueeze(-1) * y.to(dtype).unsqueeze(-2)).flatten(-2)
    return outer @ t


def geometric_product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Geometric (Clifford) product ``x y``: ``[..., 16] x [..., 16] -> [..., 16]``."""
    return _bilinear(x, y, "GP")


def outer_product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Outer (wedge) product ``x ^ y``: ``[..., 16] x [..., 16] -> [..., 16]``."""
    return _bilinear(x, y, "OP")


def join(x: torch.Tensor, y: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Regressive product (join) ``x v y = undual(dual(x) ^ dual(y))``, ``[..., 16]``.

    The join of two points is the line through them, of a line and a point the plane
    through both. Alone it is equivariant under rotations and translations but flips sign
    under reflections. With ``reference`` (``[..., 16]``, broadcastable) the result is
    multiplied by the reference's e123 component, which flips sign under reflections too,
    making the product E(3)-equivariant (GATr's "equivariant join"). A mean of the network
    inputs is the usual reference: for embedded points its e123 component is 1.
    """
    out = _bilinear(x, y, "JOIN")
    if reference is not None:
        _check(reference, "reference")
        out = out * reference[..., 14:15]
    return out


def inner_product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """GATr's invariant inner product ``<reverse(x) y>_0``: ``[..., 16] x [..., 16] -> [...]``.

    In G(3,0,1) it is the plain dot product over the 8 blades without e0
    (1, e1, e2, e3, e12, e13, e23, e123); it is invariant under all of E(3).
    """
    _check(x, "x")
    _check(y, "y")
    dtype = torch.promote_types(x.dtype, y.dtype)
    mask = table("INNER_MASK", x.device, dtype)
    return (x * y * mask).sum(-1)


def norm(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``sqrt(<x, x> + eps)``, the E(3)-invariant (semi-)norm: ``[..., 16] -> [...]``."""
    return torch.sqrt(inner_product(x, x) + eps)


def reverse(x: torch.Tensor) -> torch.Tensor:
    """Reverse ``~x`` (order of generators reversed): sign ``(-1)^(k(k-1)/2)`` on grade k."""
    _check(x)
    return x * table("REVERSE", x.device, x.dtype)


def grade_involution(x: torch.Tensor) -> torch.Tensor:
    """Grade involution ``x^``: sign ``(-1)^k`` on grade k."""
    _check(x)
    return x * table("INVOLUTION", x.device, x.dtype)


def dual(x: torch.Tensor) -> torch.Tensor:
    """Right complement: ``dual(e_A) = s e_Abar`` with ``e_A ^ dual(e_A) = e0123``.

    Metric-free (PGA's ``I^-1`` does not exist); equals clifford's ``dual()`` for PGA.
    """
    _check(x)
    return x[..., table("DUAL_PERM", x.device)] * table("DUAL_SIGN", x.device, x.dtype)


def undual(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dual` (the left complement)."""
    _check(x)
    return x[..., table("UNDUAL_PERM", x.device)] * table("UNDUAL_SIGN", x.device, x.dtype)


def grade_project(x: torch.Tensor, k: int) -> torch.Tensor:
    """``<x>_k``: keep the grade-``k`` components (k in 0..4), zero the others; ``[..., 16]``."""
    _check(x)
    if k not in range(5):
        raise ValueError(f"grade must be an integer in 0..4, got {k!r}")
    grades = table("GRADES", x.device)
    return x * (grades == k).to(x.dtype)


def _parity_odd(versor: torch.Tensor) -> torch.Tensor:
    """Boolean ``[...]``: True where the odd part dominates (odd versor)."""
    odd = table("GRADES", versor.device) % 2 == 1
    sq = versor * versor
    return sq[..., odd].sum(-1) > sq[..., ~odd].sum(-1)


def versor_inverse(versor: torch.Tensor) -> torch.Tensor:
    """Inverse ``~u / (u ~u)`` of a versor ``[..., 16]`` (``u ~u`` is a scalar for versors)."""
    _check(versor, "versor")
    rev = reverse(versor)
    # scalar part of u ~u = sum_i u_i^2 (over blades without e0: the e0 blades square to 0)
    denom = inner_product(versor, versor)
    return rev / denom.unsqueeze(-1)


def sandwich(versor: torch.Tensor, x: torch.Tensor, parity: str = "auto") -> torch.Tensor:
    """Group action of a versor on a multivector, ``[..., 16] x [..., 16] -> [..., 16]``.

    ``u x u^-1`` for even versors (rotations, translations, screws) and ``u x^ u^-1``
    (``x^`` the grade involution) for odd ones (reflections, rotoreflections), as in the
    GATr paper; this action is an algebra automorphism, so every product above commutes
    with it (the join up to the reflection sign, see :func:`join`). ``parity``: ``"even"``,
    ``"odd"`` or ``"auto"`` (per element, from which of the even/odd parts is larger).
    """
    _check(versor, "versor")
    _check(x, "x")
    if parity == "even":
        xt = x
    elif parity == "odd":
        xt = grade_involution(x)
    elif parity == "auto":
        xt = torch.where(_parity_odd(versor).unsqueeze(-1), grade_involution(x), x)
    else:
        raise ValueError(f"parity must be 'even', 'odd' or 'auto', got {parity!r}")
    return geometric_product(geometric_product(versor, xt), versor_inverse(versor))
