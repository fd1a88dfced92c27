"""Irreps bookkeeping shared by the e3nn-based layers.

Every layer of :mod:`equiformer.nn` works on the *canonical* layout of e3nn features: irreps
sorted by degree with even parity first (``0e, 0o, 1e, 1o, 2e, ...``) and simplified, so each
irrep type occupies one contiguous block ``[mul, 2l+1]`` (e3nn's channel-major layout).
"""

from __future__ import annotations

from e3nn import o3

__all__ = [
    "SCALAR",
    "as_irreps",
    "canonical_irreps",
    "check_canonical",
    "heads_irreps",
    "irreps_to_gate",
    "num_even_scalars",
    "sort_irreps",
    "spherical_harmonics_irreps",
]

#: the even scalar irrep ``0e``
SCALAR = o3.Irrep("0e")


def as_irreps(irreps: str | o3.Irreps) -> o3.Irreps:
    """``o3.Irreps`` of a string or Irreps."""
    return irreps if isinstance(irreps, o3.Irreps) else o3.Irreps(irreps)


def sort_irreps(irreps: str | o3.Irreps) -> tuple[o3.Irreps, tuple[int, ...]]:
    """Sort by (l, even before odd), stable; returns the sorted irreps and ``perm`` with ``perm[old] = new``."""
    irreps = as_irreps(irreps)
    order = sorted(range(len(irreps)), key=lambda i: (irreps[i].ir.l, -irreps[i].ir.p, i))
    perm = [0] * len(order)
    for new, old in enumerate(order):
        perm[old] = new
    return o3.Irreps([irreps[i] for i in order]), tuple(perm)


def canonical_irreps(irreps: str | o3.Irreps) -> o3.Irreps:
    """Sorted (even parity first) and simplified irreps; zero multiplicities dropped."""
    return sort_irreps(as_irreps(irreps))[0].simplify()


def check_canonical(irreps: str | o3.Irreps, name: str = "irreps") -> o3.Irreps:
    """Return ``irreps`` as ``o3.Irreps``; raise ValueError if it is not in canonical layout."""
    irreps = as_irreps(irreps)
    if irreps != canonical_irreps(irreps):
        raise ValueError(
            f"{name}={irreps} is not canonical: write it sorted by l, even parity first, each irrep once "
            f"(e.g. {canonical_irreps(irreps)})"
        )
    return irreps


def num_even_scalars(irreps: str | o3.Irreps) -> int:
    """Number of ``0e`` channels."""
    return sum(mul for mul, ir in as_irreps(irreps) if ir == SCALAR)


def irreps_to_gate(irreps: str | o3.Irreps) -> tuple[o3.Irreps, o3.Irreps, o3.Irreps]:
    """Split output irreps for a gate: (scalars ``0e`` -> SiLU, gates ``0e`` -> sigmoid, gated = the rest).

    Odd scalars ``0o`` are gated (multiplied by a sigmoid gate), as no SiLU-like function is odd.
    """
    irreps = as_irreps(irreps)
    scalars = o3.Irreps([(mul, ir) for mul, ir in irreps if ir == SCALAR]).simplify()
    gated = o3.Irreps([(mul, ir) for mul, ir in irreps if ir != SCALAR]).simplify()
    gates = o3.Irreps([(gated.num_irreps, SCALAR)]) if gated.num_irreps else o3.Irreps("")
    return scalars, gates, gated


def heads_irreps(irreps_head: str | o3.Irreps, num_heads: int) -> o3.Irreps:
    """Irreps of ``num_heads`` stacked heads: each ``mul x ir`` of a head becomes ``(mul*num_heads) x ir``.

    Inside a block, channel ``c`` belongs to head ``c // mul``.
    """
    irreps_head = check_canonical(irreps_head, "irreps_head")
    return o3.Irreps([(mul * num_heads, ir) for mul, ir in irreps_head])


def spherical_harmonics_irreps(lmax: int, parity: bool) -> o3.Irreps:
    """``1x0e+1x1o+1x2e+...`` (E(3): true parity ``(-1)^l``) or ``1x0e+1x1e+1x2e+...`` (SE(3): parity ignored)."""
    return o3.Irreps([(1, (l, (-1) ** l if parity else 1)) for l in range(lmax + 1)])
