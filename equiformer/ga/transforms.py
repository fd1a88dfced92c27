"""Random E(3) transformations as versors and as matrices, for equivariance checks.

``random_e3(...)`` returns a versor ``u`` together with the orthogonal matrix ``R`` and the
shift ``t`` of the same Euclidean map ``p -> R p + t``, so that

    extract_point(sandwich(u, embed_point(p))) == p @ R.T + t.
"""

from __future__ import annotations

import torch

from equiformer.ga.embedding import (
    embed_reflection,
    embed_rotation,
    embed_translation,
    quaternion_to_matrix,
)
from equiformer.ga.products import geometric_product

__all__ = ["random_e3", "KINDS"]

KINDS = ("rotation", "translation", "reflection", "se3", "e3_odd")


def _randn(shape, dtype, generator, scale=1.0):
    return torch.randn(*shape, dtype=dtype, generator=generator) * scale


def random_e3(
    kind: str = "se3",
    batch: tuple[int, ...] = (),
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
    shift_scale: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random Euclidean maps: (versor ``[*batch, 16]``, R ``[*batch, 3, 3]``, t ``[*batch, 3]``).

    ``kind``: ``"rotation"`` (about the origin), ``"translation"``, ``"reflection"`` (in a
    random plane, not through the origin), ``"se3"`` (translation after rotation, even
    versor) or ``"e3_odd"`` (translation after rotation after a reflection: det R = -1).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    batch = tuple(batch)
    eye = torch.eye(3, dtype=dtype).expand(*batch, 3, 3)
    zero = torch.zeros(*batch, 3, dtype=dtype)

    def rot():
        q = _randn((*batch, 4), dtype, generator)
        q = q / q.norm(dim=-1, keepdim=True)
        return embed_rotation(q), quaternion_to_matrix(q), zero

    def trans():
        t = _randn((*batch, 3), dtype, generator, shift_scale)
        return embed_translation(t), eye, t

    def refl():
        n = _randn((*batch, 3), dtype, generator)
        n = n / n.norm(dim=-1, keepdim=True)
        d = _randn((*batch, 1), dtype, generator, shift_scale)
        h = eye - 2 * n.unsqueeze(-1) * n.unsqueeze(-2)
        return embed_reflection(n, d), h, -2 * d * n

    def compose(a, b):  # a after b
        ua, ra, ta = a
        ub, rb, tb = b
        u = geometric_product(ua, ub)
        r = ra @ rb
        t = (ra @ tb.unsqueeze(-1)).squeeze(-1) + ta
        return u, r, t

    if kind == "rotation":
        return rot()
    if kind == "translation":
        return trans()
    if kind == "reflection":
        return refl()
    if kind == "se3":
        return compose(trans(), rot())
    return compose(trans(), compose(rot(), refl()))
