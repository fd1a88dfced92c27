"""Embed 3D geometric objects into G(3,0,1) multivectors ``[..., 16]`` and extract them back.

Conventions (all checked in tests/test_ga_algebra.py against plain matrix algebra):

============================  ==================================================================
object                        multivector
============================  ==================================================================
scalar ``s``                  ``s``                                  (index 0)
pseudoscalar ``s``            ``s e0123``                            (index 15)
point ``p``                   ``e123 - p_x e023 + p_y e013 - p_z e012``
                              (= ``e123 + p_x e032 + p_y e013 + p_z e021``, the paper's form)
direction ``v`` (ideal pt.)   ``- v_x e023 + v_y e013 - v_z e012``   (a point at infinity)
plane ``n.x + d = 0``         ``n_x e1 + n_y e2 + n_z e3 + d e0``
translation by ``t``          ``1 - (t_x e01 + t_y e02 + t_z e03) / 2``
rotation, unit quaternion     ``w - x e23 + y e13 - z e12`` for ``q = (w, x, y, z)``
                              (scalar first, Hamilton, active: acts as the matrix ``R(q)``)
reflection in a plane         the plane itself (an odd versor)
============================  ==================================================================

Points are homogeneous: an odd versor (reflection) returns ``-e123 + ...`` (the weight
flips sign with the grade involution), so :func:`extract_point` divides by the e123
component. The translation sign follows from the point convention (with it, the
paper's ``1 + t e0i / 2`` would translate by ``-t``). Apply any of the versors to any
multivector with :func:`equiformer.ga.sandwich`.
"""

from __future__ import annotations

import torch

__all__ = [
    "embed_scalar",
    "extract_scalar",
    "embed_pseudoscalar",
    "extract_pseudoscalar",
    "embed_point",
    "extract_point",
    "embed_direction",
    "extract_direction",
    "embed_plane",
    "extract_plane",
    "embed_translation",
    "embed_rotation",
    "embed_reflection",
    "quaternion_to_matrix",
]

_E0I = (5, 6, 7)  # e01, e02, e03
_E23, _E13, _E12 = 10, 9, 8
_E012, _E013, _E023, _E123 = 11, 12, 13, 14
_POINT_IDX = (_E023, _E013, _E012)  # components carrying x, y, z
_POINT_SIGN = (-1.0, 1.0, -1.0)


def _check_last(x: torch.Tensor, n: int, what: str) -> None:
    if x.shape[-1:] != (n,):
        raise ValueError(f"{what} must have shape [..., {n}], got {tuple(x.shape)}")


def _zeros(like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros(*like.shape[:-1], 16)


def _scatter(base: torch.Tensor, idx: tuple[int, ...], values: torch.Tensor) -> torch.Tensor:
    """``base`` with ``base[..., idx] = values`` (out of place, autograd-friendly)."""
    index = torch.tensor(idx, device=base.device).expand(*values.shape[:-1], len(idx))
    return base.scatter(-1, index, values)


def embed_scalar(s: torch.Tensor) -> torch.Tensor:
    """Scalars ``[..., 1]`` -> multivectors ``[..., 16]``."""
    _check_last(s, 1, "scalars")
    return _scatter(_zeros(s), (0,), s)


def extract_scalar(x: torch.Tensor) -> torch.Tensor:
    """Multivectors ``[..., 16]`` -> scalar components ``[..., 1]``."""
    _check_last(x, 16, "multivectors")
    return x[..., 0:1]


def embed_pseudoscalar(s: torch.Tensor) -> torch.Tensor:
    """Pseudoscalars ``[..., 1]`` -> multivectors ``[..., 16]`` (``s e0123``)."""
    _check_last(s, 1, "pseudoscalars")
    return _scatter(_zeros(s), (15,), s)


def extract_pseudoscalar(x: torch.Tensor) -> torch.Tensor:
    """Multivectors ``[..., 16]`` -> e0123 components ``[..., 1]``."""
    _check_last(x, 16, "multivectors")
    return x[..., 15:16]


def embed_point(p: torch.Tensor) -> torch.Tensor:
    """Points ``[..., 3]`` (any length unit) -> trivectors ``[..., 16]`` with e123 = 1."""
    _check_last(p, 3, "points")
    sign = p.new_tensor(_POINT_SIGN)
    out = _scatter(_zeros(p), _POINT_IDX, p * sign)
    return _scatter(out, (_E123,), torch.ones_like(p[..., :1]))


def extract_point(x: torch.Tensor, divide_by_weight: bool = True, eps: float = 1e-12) -> torch.Tensor:
    """Multivectors ``[..., 16]`` -> points ``[..., 3]``.

    With ``divide_by_weight`` (default) the e0ij components are divided by the e123
    weight, which makes the result translation- and reflection-equivariant for any
    multivector with non-zero weight (``|weight| < eps`` is clamped to ``eps``, keeping
    its sign). Without it the raw components are returned (exact only for weight 1).
    """
    _check_last(x, 16, "multivectors")
    coords = x[..., list(_POINT_IDX)] * x.new_tensor(_POINT_SIGN)
    if not divide_by_weight:
        return coords
    w = x[..., _E123 : _E123 + 1]
    w = torch.where(w.abs() < eps, torch.where(w < 0, -eps, eps) * torch.ones_like(w), w)
    return coords / w


def embed_direction(v: torch.Tensor) -> torch.Tensor:
    """Directions ``[..., 3]`` -> ideal points (trivectors without e123) ``[..., 16]``.

    Translation-invariant; rotate like vectors. Under a reflection ``H`` the sandwich
    returns ``-embed_direction(H v)`` (the homogeneous sign of points, see module doc).
    """
    _check_last(v, 3, "directions")
    return _scatter(_zeros(v), _POINT_IDX, v * v.new_tensor(_POINT_SIGN))


def extract_direction(x: torch.Tensor) -> torch.Tensor:
    """Multivectors ``[..., 16]`` -> the direction carried by the e0ij components ``[..., 3]``."""
    return extract_point(x, divide_by_weight=False)


def embed_plane(normal: torch.Tensor, offset: torch.Tensor | float = 0.0) -> torch.Tensor:
    """The plane ``{x : normal . x + offset = 0}`` -> vector ``n_i e_i + offset e0``.

    ``normal`` ``[..., 3]``, ``offset`` ``[..., 1]`` or a float. A plane through a point
    ``p`` with normal ``n`` has ``offset = -n . p``. As a versor the plane is the
    reflection in itself (see :func:`embed_reflection`).
    """
    _check_last(normal, 3, "plane normals")
    if not torch.is_tensor(offset):
        offset = torch.full_like(normal[..., :1], float(offset))
    _check_last(offset, 1, "plane offsets")
    offset = offset.expand(*normal.shape[:-1], 1)
    return _scatter(_scatter(_zeros(normal), (2, 3, 4), normal), (1,), offset.to(normal.dtype))


def extract_plane(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Multivectors ``[..., 16]`` -> (normal ``[..., 3]``, offset ``[..., 1]``) of the grade-1 part."""
    _check_last(x, 16, "multivectors")
    return x[..., 2:5], x[..., 1:2]


def embed_translation(t: torch.Tensor) -> torch.Tensor:
    """Translation vectors ``[..., 3]`` -> translators ``1 - t_i e0i / 2`` ``[..., 16]`` (even versor)."""
    _check_last(t, 3, "translations")
    out = _scatter(_zeros(t), _E0I, -0.5 * t)
    return _scatter(out, (0,), torch.ones_like(t[..., :1]))


def embed_rotation(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``[..., 4]`` as ``(w, x, y, z)`` -> rotors ``w - x e23 + y e13 - z e12``.

    Hamilton convention, scalar first; the sandwich rotates points by
    :func:`quaternion_to_matrix` ``(q)`` about the origin. ``q`` and ``-q`` give the same
    rotation. Non-unit quaternions work too (the sandwich divides by the norm).
    """
    _check_last(q, 4, "quaternions")
    vals = torch.stack([q[..., 0], -q[..., 1], q[..., 2], -q[..., 3]], dim=-1)
    return _scatter(_zeros(q), (0, _E23, _E13, _E12), vals)


def embed_reflection(normal: torch.Tensor, offset: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Reflection in the plane ``normal . x + offset = 0`` -> the plane as an odd versor ``[..., 16]``.

    Acts on points as the Householder map ``x -> x - 2 (n.x + offset) n / |n|^2``.
    """
    return embed_plane(normal, offset)


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``[..., 4]`` ``(w, x, y, z)`` -> rotation matrices ``[..., 3, 3]`` (active)."""
    _check_last(q, 4, "quaternions")
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)
