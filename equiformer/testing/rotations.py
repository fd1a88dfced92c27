"""Random elements of O(3), uniform (Haar) and reproducible through a ``torch.Generator``.

A proper rotation comes from a uniformly random unit quaternion (the normalised 4-vector of
standard normals is uniform on S^3, whose double cover of SO(3) carries the Haar measure).
Improper elements are ``-R``: since ``-I`` is central, ``R -> -R`` maps the Haar measure of
SO(3) onto that of the det -1 coset.
"""

from __future__ import annotations

import torch

__all__ = ["random_rotation", "random_orthogonal", "random_reflection", "quaternion_to_matrix"]


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] of (not necessarily unit) quaternions [..., 4] = (w, x, y, z)."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(q.shape[:-1] + (3, 3))


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
