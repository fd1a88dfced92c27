"""The intermediate record every file parser yields before it becomes a ``Data``.

Parsers produce :class:`Record` objects (plain numpy, no torch) with the line or record
where each structure starts, so that :func:`equiformer.data.read` can name the exact
place of a problem; :func:`to_data` turns one into the data contract through
:func:`equiformer.data.contract.make_data`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from equiformer.data.contract import StructureError, make_data


@dataclass
class Record:
    """One structure read from a file.

    Attributes:
        z: [N] atomic numbers.
        pos: [N, 3] Cartesian positions, Å.
        cell: [3, 3] lattice rows in Å, or None for a molecule.
        pbc: [3] periodic flags.
        energy: total energy in eV, or None.
        forces: [N, 3] forces in eV/Å, or None.
        where: location of the structure inside its file for messages, e.g. ``"line 12"``.
        extra: further fields for the Data (``name``, ``smiles``, ``tags``, ``fixed``, ...).
    """

    z: np.ndarray
    pos: np.ndarray
    cell: np.ndarray | None = None
    pbc: np.ndarray | None = None
    energy: float | None = None
    forces: np.ndarray | None = None
    where: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def structure_source(path: str, index: int, count: int) -> str:
    """``"file"`` for a file holding one structure, ``"file[i]"`` for structure i of several."""
    return path if count == 1 else f"{path}[{index}]"


def to_data(
    rec: Record,
    source: str,
    index: int | None = None,
    check_overlap: bool = True,
    dtype: torch.dtype | None = None,
) -> Any:
    """Validate a record and build its ``Data`` (with ``source``, and ``index`` unless None).

    Validation errors name the source and, where known, the line: ``"x.xyz[2] (line 9): ..."``.
    """
    kwargs: dict[str, Any] = dict(rec.extra)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if index is not None:
        kwargs["index"] = index
    try:
        return make_data(
            np.array(rec.z, dtype=np.int64),
            np.array(rec.pos, dtype=np.float64),
            cell=None if rec.cell is None else np.array(rec.cell, dtype=np.float64),
            pbc=rec.pbc,
            energy=rec.energy,
            forces=None if rec.forces is None else np.array(rec.forces, dtype=np.float64),
            source=source,
            check_overlap=check_overlap,
            **kwargs,
        )
    except StructureError as exc:
        msg = str(exc)
        if rec.where and msg.startswith(f"{source}: "):
            msg = f"{source} ({rec.where}): " + msg[len(source) + 2 :]
        raise StructureError(msg) from None
