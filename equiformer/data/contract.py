"""The one data contract every dataset and converter yields (see DESIGN.md).

A structure is a :class:`torch_geometric.data.Data` with

=========  ==================  ==================================================
field      shape, dtype        unit / meaning
=========  ==================  ==================================================
``z``      [N] long            atomic numbers (1..118)
``pos``    [N, 3] float        Cartesian positions, Å
``cell``   [1, 3, 3] float     lattice vectors as rows, Å (zeros when no cell)
``pbc``    [1, 3] bool         periodic directions
``y``      [1, T] float        graph targets (names/units given by the dataset)
``energy`` [1] float           total energy, eV (optional)
``forces`` [N, 3] float        forces, eV/Å (optional)
=========  ==================  ==================================================

``cell`` and ``pbc`` are always present so that molecules and crystals batch together
(PyG concatenates them to ``[B, 3, 3]`` and ``[B, 3]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch_geometric.data import Data

MAX_Z = 118
MIN_DISTANCE = 0.1  # Å; closer atoms are rejected as overlapping

_SYMBOLS = (
    "X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As "
    "Se Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd "
    "Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am "
    "Cm Bk Cf Es Fm Md No Lr Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og"
).split()
#: chemical symbol of each atomic number (index 0 is a placeholder "X")
CHEMICAL_SYMBOLS: tuple[str, ...] = tuple(_SYMBOLS)
ATOMIC_NUMBERS: dict[str, int] = {s: i for i, s in enumerate(_SYMBOLS) if i > 0}


class StructureError(ValueError):
    """A structure that cannot be turned into the data contract.

    The message names the source (file, SMILES, object) and the problem.
    """


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def atomic_number(symbol: str, source: str | None = None) -> int:
    """Atomic number of a chemical symbol (case-insensitive first letter); raises StructureError."""
    key = symbol.strip()
    key = key[:1].upper() + key[1:].lower()
    if key not in ATOMIC_NUMBERS:
        raise StructureError(f"{_where(source)}unknown element {symbol!r}")
    return ATOMIC_NUMBERS[key]


def validate_structure(
    z: np.ndarray,
    pos: np.ndarray,
    cell: np.ndarray | None = None,
    pbc: np.ndarray | None = None,
    source: str | None = None,
    check_overlap: bool = True,
) -> None:
    """Reject empty structures, unknown elements, non-finite coordinates and overlapping atoms.

    Args:
        z: [N] atomic numbers.
        pos: [N, 3] positions in Å.
        cell: [3, 3] lattice rows in Å, or None.
        pbc: [3] periodic flags, or None.
        source: name used in error messages (file name, SMILES, ...).
        check_overlap: also reject pairs closer than 0.1 Å (periodic images included).
    """
    where = _where(source)
    if z.ndim != 1 or len(z) == 0:
        raise StructureError(f"{where}empty structure (no atoms)")
    if pos.shape != (len(z), 3):
        raise StructureError(f"{where}positions have shape {tuple(pos.shape)}, expected ({len(z)}, 3)")
    bad = (z < 1) | (z > MAX_Z)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise StructureError(f"{where}atom {i} has unknown atomic number {int(z[i])}")
    if not np.isfinite(pos).all():
        i = int(np.flatnonzero(~np.isfinite(pos).all(axis=1))[0])
        raise StructureError(f"{where}atom {i} has non-finite coordinates {pos[i].tolist()}")
    if cell is not None and not np.isfinite(cell).all():
        raise StructureError(f"{where}cell has non-finite entries")
    if pbc is not None and np.any(pbc):
        assert cell is not None
        vol = abs(float(np.linalg.det(cell)))
        if vol < 1e-6 and np.all(pbc):
            raise StructureError(f"{where}periodic structure has a degenerate cell (volume {vol:.3g} Å^3)")
        for k in np.flatnonzero(pbc):
            if np.linalg.norm(cell[k]) < 1e-6:
                raise StructureError(f"{where}periodic along lattice vector {k} but that vector is zero")
    if check_overlap and len(z) > 1:
        _check_overlap(pos, cell, pbc, where)


def _check_overlap(pos: np.ndarray, cell: np.ndarray | None, pbc: np.ndarray | None, where: str) -> None:
    if pbc is not None and np.any(pbc):
        from equiformer.graph import radius_graph_pbc

        edge_index, _ = radius_graph_pbc(
            torch.as_tensor(pos, dtype=torch.float64), torch.as_tensor(cell, dtype=torch.float64),
            torch.as_tensor(pbc), MIN_DISTANCE,
        )
        if edge_index.shape[1] == 0:
            return
        j, i = edge_index[:, 0].tolist()
    else:
        # in numpy: far cheaper than a torch graph build for one small molecule
        if len(pos) <= 512:
            d2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
            close = np.argwhere(np.triu(d2 < MIN_DISTANCE**2, k=1))
        else:
            from scipy.spatial import cKDTree

            close = cKDTree(pos).query_pairs(MIN_DISTANCE, output_type="ndarray")
        if len(close) == 0:
            return
        i, j = sorted(close[0].tolist())
    raise StructureError(f"{where}atoms {i} and {j} overlap (closer than {MIN_DISTANCE} Å)")


def make_data(
    z: Any,
    pos: Any,
    cell: Any | None = None,
    pbc: Any | None = None,
    y: Any | None = None,
    energy: float | None = None,
    forces: Any | None = None,
    source: str | None = None,
    check_overlap: bool = True,
    dtype: torch.dtype = torch.get_default_dtype(),
    **extra: Any,
) -> Data:
    """Build a contract-conforming ``Data`` after validating the inputs.

    Args:
        z: [N] atomic numbers.
        pos: [N, 3] positions in Å.
        cell: [3, 3] (or [1, 3, 3]) lattice rows in Å; None for a molecule.
        pbc: [3] periodic flags (or a single bool); default False in all directions.
        y: [T] or [1, T] graph targets.
        energy: total energy in eV.
        forces: [N, 3] in eV/Å.
        source: where the structure came from, used in error messages and kept as ``data.source``.
        extra: further fields copied onto the Data (e.g. ``idx``, ``tags``, ``fixed``).
    """
    # own copies: callers pass read-only views (e.g. pymatgen's lattice.matrix) and the
    # tensors below must not share memory with them
    z_np = np.array(z, dtype=np.int64).reshape(-1)
    pos_np = np.array(pos, dtype=np.float64)
    cell_np = None if cell is None else np.array(cell, dtype=np.float64).reshape(3, 3)
    if pbc is None:
        pbc_np = np.zeros(3, dtype=bool)
    else:
        pbc_np = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
    if pbc_np.any() and cell_np is None:
        raise StructureError(f"{_where(source)}periodic structure without a cell")
    validate_structure(z_np, pos_np, cell_np, pbc_np, source=source, check_overlap=check_overlap)
    data = Data(
        z=torch.as_tensor(z_np, dtype=torch.long),
        pos=torch.as_tensor(pos_np, dtype=dtype),
        cell=torch.as_tensor(cell_np if cell_np is not None else np.zeros((3, 3)), dtype=dtype).view(1, 3, 3),
        pbc=torch.as_tensor(pbc_np).view(1, 3),
    )
    if y is not None:
        data.y = torch.as_tensor(np.asarray(y, dtype=np.float64), dtype=dtype).view(1, -1)
    if energy is not None:
        data.energy = torch.tensor([float(energy)], dtype=dtype)
    if forces is not None:
        f = torch.as_tensor(np.asarray(forces, dtype=np.float64), dtype=dtype)
        if f.shape != (len(z_np), 3):
            raise StructureError(f"{_where(source)}forces have shape {tuple(f.shape)}, expected ({len(z_np)}, 3)")
        data.forces = f
    if source is not None:
        data.source = str(source)
    for key, value in extra.items():
        setattr(data, key, value)
    return data


def formula(z: Any) -> str:
    """Hill-order chemical formula of atomic numbers, e.g. ``C2H6O``."""
    counts: dict[str, int] = {}
    for zi in np.asarray(z).reshape(-1).tolist():
        s = CHEMICAL_SYMBOLS[int(zi)]
        counts[s] = counts.get(s, 0) + 1
    if "C" in counts:
        order = ["C"] + (["H"] if "H" in counts else []) + sorted(k for k in counts if k not in ("C", "H"))
    else:
        order = sorted(counts)
    return "".join(f"{s}{counts[s] if counts[s] > 1 else ''}" for s in order)
