"""What a ``Data`` holds, in plain numbers: :func:`describe` (used by ``equiformer data inspect``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Data

from equiformer.data.contract import CHEMICAL_SYMBOLS, formula


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)


def lattice_parameters(cell: np.ndarray) -> dict[str, float] | None:
    """a, b, c (Å) and alpha, beta, gamma (degrees) of lattice rows; None if a vector is zero."""
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    lengths = np.linalg.norm(cell, axis=1)
    if (lengths < 1e-12).any():
        return None

    def angle(u: np.ndarray, v: np.ndarray) -> float:
        c = float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))
        return math.degrees(math.acos(max(-1.0, min(1.0, c))))

    return {
        "a": float(lengths[0]),
        "b": float(lengths[1]),
        "c": float(lengths[2]),
        "alpha": angle(cell[1], cell[2]),
        "beta": angle(cell[0], cell[2]),
        "gamma": angle(cell[0], cell[1]),
    }


def describe(data: Data) -> dict[str, Any]:
    """A JSON-serialisable summary of one structure.

    Keys: ``source``, ``index`` (or None), ``name``, ``formula`` (Hill order), ``n_atoms``,
    ``elements`` ({symbol: count}), ``pbc`` [3 bool], ``cell`` (3x3 Å rows, or None when the
    cell is zero), ``lattice`` ({a,b,c in Å, alpha,beta,gamma in degrees} or None),
    ``volume`` (Å^3, or None), ``energy`` (eV, or None), ``forces`` (bool),
    ``max_force`` (largest per-atom force norm in eV/Å, or None), ``n_fixed`` (atoms held
    fixed, or None), ``smiles`` (or None), ``chains`` and ``n_residues`` (PDB files, else None).
    """
    z = data.z.view(-1).tolist()
    elements: dict[str, int] = {}
    for zi in z:
        s = CHEMICAL_SYMBOLS[int(zi)]
        elements[s] = elements.get(s, 0) + 1
    cell = _np(data.cell).reshape(3, 3) if getattr(data, "cell", None) is not None else np.zeros((3, 3))
    pbc = _np(data.pbc).astype(bool).reshape(3).tolist() if getattr(data, "pbc", None) is not None else [False] * 3
    has_cell = bool(np.abs(cell).max() > 0)
    volume = abs(float(np.linalg.det(cell))) if has_cell else None
    energy = getattr(data, "energy", None)
    forces = getattr(data, "forces", None)
    fixed = getattr(data, "fixed", None)
    index = getattr(data, "index", None)
    return {
        "source": str(getattr(data, "source", "") or ""),
        "index": int(index) if index is not None else None,
        "name": str(getattr(data, "name", "") or ""),
        "formula": formula(data.z),
        "n_atoms": len(z),
        "elements": elements,
        "pbc": [bool(p) for p in pbc],
        "cell": cell.tolist() if has_cell else None,
        "lattice": lattice_parameters(cell) if has_cell else None,
        "volume": volume if volume and volume > 1e-12 else None,
        "energy": float(_np(energy).reshape(-1)[0]) if energy is not None else None,
        "forces": forces is not None,
        "max_force": float(np.linalg.norm(_np(forces), axis=1).max()) if forces is not None and len(z) else None,
        "n_fixed": int(_np(fixed).astype(bool).sum()) if fixed is not None else None,
        "smiles": str(data.smiles) if getattr(data, "smiles", None) else None,
        **_residues(data),
    }


def _residues(data: Data) -> dict[str, Any]:
    chains = getattr(data, "chains", None)
    numbers = getattr(data, "residue_numbers", None)
    if chains is None or numbers is None:
        return {"chains": None, "n_residues": None}
    keys = set(zip(chains, numbers.view(-1).tolist()))
    return {"chains": sorted(set(chains)), "n_residues": len(keys)}
