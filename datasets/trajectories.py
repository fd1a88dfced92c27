"""Frames of ASE trajectories (``.traj``) and extended-XYZ files as plain numpy arrays.

:func:`read_frames` reads every frame of one file with ASE and returns a
:class:`FrameArrays` (concatenated atoms plus per-frame offsets), the form the datasets
cache. Per frame: atomic numbers, positions (Å), cell rows (Å), pbc, the *stored* total
energy (eV) and forces (eV/Å, including those on fixed atoms: ASE's ``get_forces()`` would
zero them), tags (0 where the file has none) and fixed atoms (``FixAtoms`` constraints).
Errors name the file and the frame.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FrameArrays", "TRAJECTORY_SUFFIXES", "atoms_arrays", "read_frames"]

#: file endings read as trajectories (ASE picks the format from the ending)
TRAJECTORY_SUFFIXES = (".traj", ".extxyz", ".xyz")


@dataclass
class FrameArrays:
    """All frames of one file.

    Attributes:
        z: [A] atomic numbers of all frames' atoms, concatenated.
        pos: [A, 3] positions, Å.
        forces: [A, 3] forces, eV/Å (NaN where a frame has none).
        tags: [A] OC20 tags (0 subsurface, 1 surface, 2 adsorbate; 0 when absent).
        fixed: [A] bool, atom held fixed by a ``FixAtoms`` constraint.
        cell: [F, 3, 3] lattice rows, Å.
        pbc: [F, 3] bool.
        energy: [F] total energy, eV (NaN where a frame has none).
        natoms: [F] atoms per frame.
    """

    z: np.ndarray
    pos: np.ndarray
    forces: np.ndarray
    tags: np.ndarray
    fixed: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: np.ndarray
    natoms: np.ndarray

    @property
    def num_frames(self) -> int:
        return int(len(self.natoms))


def atoms_arrays(atoms: Any, where: str) -> dict[str, Any]:
    """One ``ase.Atoms`` as numpy arrays (keys as :class:`FrameArrays`, energy a float)."""
    from ase.constraints import FixAtoms

    n = len(atoms)
    if n == 0:
        raise ValueError(f"{where}: frame has no atoms")
    results = dict(getattr(atoms.calc, "results", {}) or {}) if atoms.calc is not None else {}
    energy = results.get("energy")
    forces = results.get("forces")
    fixed = np.zeros(n, dtype=bool)
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            fixed[c.get_indices()] = True
    out = {
        "z": np.asarray(atoms.numbers, dtype=np.int64),
        "pos": np.asarray(atoms.positions, dtype=np.float64),
        "cell": np.asarray(atoms.cell.array, dtype=np.float64).reshape(3, 3),
        "pbc": np.asarray(atoms.pbc, dtype=bool).reshape(3),
        "tags": np.asarray(atoms.get_tags(), dtype=np.int64) if atoms.has("tags") else np.zeros(n, dtype=np.int64),
        "fixed": fixed,
        "energy": float("nan") if energy is None else float(energy),
        "forces": np.full((n, 3), np.nan) if forces is None else np.asarray(forces, dtype=np.float64).reshape(n, 3),
    }
    if not np.isfinite(out["pos"]).all():
        raise ValueError(f"{where}: non-finite positions")
    return out


def read_frames(path: str | os.PathLike[str], fmt: str | None = None) -> FrameArrays:
    """Every frame of an ASE-readable file (``.traj``, ``.extxyz``, ...).

    Raises:
        FileNotFoundError: no such file.
        ValueError: ASE cannot read it, or it holds no frames (message names the file).
    """
    from ase.io import read

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such trajectory file")
    try:
        frames = read(str(p), index=":", format=fmt)
    except Exception as exc:  # noqa: BLE001 - ASE raises many kinds; the user needs the file name
        raise ValueError(f"{p}: cannot read as a trajectory ({type(exc).__name__}: {exc})") from None
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise ValueError(f"{p}: file holds no frames")
    per = [atoms_arrays(a, f"{p}[frame {i}]") for i, a in enumerate(frames)]
    return FrameArrays(
        z=np.concatenate([f["z"] for f in per]),
        pos=np.concatenate([f["pos"] for f in per]),
        forces=np.concatenate([f["forces"] for f in per]),
        tags=np.concatenate([f["tags"] for f in per]),
        fixed=np.concatenate([f["fixed"] for f in per]),
        cell=np.stack([f["cell"] for f in per]),
        pbc=np.stack([f["pbc"] for f in per]),
        energy=np.array([f["energy"] for f in per], dtype=np.float64),
        natoms=np.array([len(f["z"]) for f in per], dtype=np.int64),
    )
