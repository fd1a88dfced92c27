"""Irreps helpers on top of e3nn (canonical layout, gates, attention heads, spherical-harmonic irreps)."""

from .irreps import (
    SCALAR,
    as_irreps,
    canonical_irreps,
    check_canonical,
    heads_irreps,
    irreps_to_gate,
    num_even_scalars,
    sort_irreps,
    spherical_harmonics_irreps,
)

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
