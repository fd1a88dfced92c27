"""Random elements of O(3), uniform (Haar) and reproducible through a ``torch.Generator``.

A proper rotation comes from a uniformly random unit quaternion (the normalised 4-vector of
standard normals is uniform on S^3, whose double cover of SO(3) carries the Haar measure).
Improper elements are ``-R``: since ``-I`` is central, ``R -> -R`` maps the Haar measure of
SO(3) onto that of the det -1 coset.
"""

from __future__ import annotations

import torch

from equiformer.ga.embedding import quaternion_to_matrix  # one implementation, re-exported here

__all__ = ["random_rotation", "random_orthogonal", "random_reflection", "quaternion_to_matrix"]


def random_rotation(
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A Haar-uniform proper rotation, [3, 3] with det +1.

    Apply to row vectors as ``pos @ R.T``.
    """
    q = torch.randn(4, dtype=torch.float64, generator=generator)
    while float(q.norm()) < 1e-6:  # measure-zero event; resample rather than divide by ~0
        q = torch.randn(4, dtype=torch.float64, generator=generator)
    return quaternion_to_matrix(q).to(dtype=dtype, device=device)


def random_reflection(
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A Haar-uniform improper orthogonal matrix, [3, 3] with det -1 (a rotation times inversion)."""
    return -random_rotation(dtype=dtype, generator=generator, device=device)


def random_orthogonal(
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A Haar-uniform element of O(3), [3, 3]: det +1 or -1 with probability 1/2 each."""
    r = random_rotation(dtype=dtype, generator=generator, device=device)
    flip = bool(torch.randint(0, 2, (1,), generator=generator).item())
    return -r if flip else r
