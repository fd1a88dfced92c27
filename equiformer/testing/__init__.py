"""Public test harness: check any model against the symmetries of chemistry.

Models are callables ``model(data) -> dict[str, Tensor]`` on PyG ``Data``/``Batch`` following
:mod:`equiformer.data.contract`. Every check raises an ``AssertionError`` whose message names
the failing output, the transformation, the max error against the tolerance and a likely cause,
and returns the measured errors when it passes.

>>> from equiformer.testing import assert_equivariant, assert_forces_are_gradients
>>> assert_equivariant(model, batch, irreps={"energy": "0e", "forces": "1o", "dipole": "1o"},
...                    dtype=torch.float64)                  # rotation, reflection, translation, permutation
>>> assert_periodic_invariant(model, crystal, extensive=["energy"], per_atom=["forces"])
>>> assert_forces_are_gradients(model, data, dtype=torch.float64)
>>> assert_smooth_at_cutoff(model, molecule, cutoff=5.0)

Run equivariance checks in float64 (``dtype=torch.float64`` casts a copy of the model and
the data): errors of a correct model are then ~1e-14, far below the default tolerance
(1e-10 relative), while float32 round-off alone reaches ~1e-6.
"""

from equiformer.testing.equivariance import CARTESIAN, DEFAULT_IRREPS, assert_equivariant
from equiformer.testing.forces import assert_forces_are_gradients
from equiformer.testing.periodic import (
    DEFAULT_CHECKS,
    DEFAULT_KINDS,
    assert_periodic_invariant,
    data_to_structure,
    structure_to_data,
)
from equiformer.testing.rotations import random_orthogonal, random_reflection, random_rotation
from equiformer.testing.smoothness import assert_smooth_at_cutoff, check_smoothness

__all__ = [
    "CARTESIAN",
    "DEFAULT_CHECKS",
    "DEFAULT_IRREPS",
    "DEFAULT_KINDS",
    "assert_equivariant",
    "assert_forces_are_gradients",
    "assert_periodic_invariant",
    "assert_smooth_at_cutoff",
    "check_smoothness",
    "data_to_structure",
    "random_orthogonal",
    "random_reflection",
    "random_rotation",
    "structure_to_data",
]
