"""Cell and periodic-boundary helpers for neighbour search.

All functions are batched over graphs: ``cell`` is ``[B, 3, 3]`` (lattice vectors as rows, Å),
``pbc`` is ``[B, 3]`` bool. Non-periodic directions never receive periodic images; their lattice
vector may be anything (zeros for molecules).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "as_batched_cell_pbc",
    "effective_cell",
    "perpendicular_heights",
    "reduce_cell",
    "search_geometry",
    "wrap_positions",
]


def as_batched_cell_pbc(
    cell: Tensor | None, pbc: Tensor | None, num_graphs: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Bring ``cell`` ([3,3], [1,3,3] or [B,3,3]) and ``pbc`` ([3], [1,3] or [B,3]) to ``[B,3,3]`` / ``[B,3]``.

    ``None`` means no cell (zeros) / no periodicity. A single cell or pbc row is broadcast to all graphs.
    Raises ValueError on shapes that do not fit ``num_graphs``.
    """
    if cell is None:
        cell = torch.zeros(num_graphs, 3, 3, device=device, dtype=dtype)
    cell = torch.as_tensor(cell, device=device)
    if not torch.is_floating_point(cell):
        cell = cell.to(dtype)
    if cell.dim() == 2:
        cell = cell.unsqueeze(0)
    if cell.dim() != 3 or cell.shape[1:] != (3, 3):
        raise ValueError(f"cell must have shape [3,3] or [B,3,3], got {tuple(cell.shape)}")
    if cell.shape[0] == 1 and num_graphs != 1:
        cell = cell.expand(num_graphs, 3, 3)
    if cell.shape[0] != num_graphs:
        raise ValueError(f"cell holds {cell.shape[0]} cells but the batch has {num_graphs} graphs")
    if pbc is None:
        pbc = torch.zeros(num_graphs, 3, dtype=torch.bool, device=device)
    pbc = torch.as_tensor(pbc, device=device).to(torch.bool)
    if pbc.dim() == 1:
        pbc = pbc.unsqueeze(0)
    if pbc.dim() != 2 or pbc.shape[1] != 3:
        raise ValueError(f"pbc must have shape [3] or [B,3], got {tuple(pbc.shape)}")
    if pbc.shape[0] == 1 and num_graphs != 1:
        pbc = pbc.expand(num_graphs, 3)
    if pbc.shape[0] != num_graphs:
        raise ValueError(f"pbc holds {pbc.shape[0]} rows but the batch has {num_graphs} graphs")
    return cell, pbc


def _reduce_cell_np(cell: np.ndarray, pbc: np.ndarray, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """numpy core of :func:`reduce_cell` (float64 [B,3,3], bool [B,3]) -> (reduced, M int64)."""
    red = np.array(cell, dtype=np.float64, copy=True)
    B = red.shape[0]
    trans = np.repeat(np.eye(3)[None], B, axis=0)
    pairs = [(k, l) for k in range(3) for l in range(3) if k != l]
    both = {(k, l): pbc[:, k] & pbc[:, l] for k, l in pairs}
    if not any(v.any() for v in both.values()):
        return red, trans.astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(max_iter):
            changed = False
            for k, l in pairs:
                num = np.einsum("bi,bi->b", red[:, k], red[:, l])
                den = np.einsum("bi,bi->b", red[:, l], red[:, l])
                q = np.round(num / den)
                q = np.where(both[(k, l)] & np.isfinite(q) & (den > 0), q, 0.0)
                if q.any():
                    red[:, k] -= q[:, None] * red[:, l]
                    trans[:, k] -= q[:, None] * trans[:, l]
                    changed = True
            if not changed:
                break
    return red, np.round(trans).astype(np.int64)


def reduce_cell(cell: Tensor, pbc: Tensor, max_iter: int = 100) -> tuple[Tensor, Tensor]:
    """Pairwise (Gauss) reduction of the periodic lattice vectors, batched over graphs.

    Repeats ``a_k -= round(a_k.a_l / a_l.a_l) a_l`` over pairs of periodic directions until no
    vector shortens. The lattice is unchanged, but a strongly skewed cell becomes a compact one whose
    perpendicular heights are close to its vector lengths, so far fewer periodic images are needed.

    Args:
        cell: [B, 3, 3] lattice rows.
        pbc: [B, 3] bool; non-periodic rows are left alone.
    Returns:
        (reduced [B, 3, 3] (cell's dtype/device), M [B, 3, 3] long) with ``reduced = M @ cell`` and
        ``det M = +-1``. An image shift ``s`` in the reduced basis is ``s @ M`` in the original one.
    """
    red, trans = _reduce_cell_np(_np64(cell), pbc.detach().cpu().numpy().astype(bool), max_iter)
    return torch.as_tensor(red, dtype=cell.dtype, device=cell.device), torch.as_tensor(trans, device=cell.device)


def _np64(x: Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


def _unit_np(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-300)


def _effective_cell_np(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """numpy core of :func:`effective_cell`; raises ValueError for degenerate periodic vectors."""
    B = cell.shape[0]
    eff = np.where(pbc[:, :, None], cell, np.eye(3)[None])
    nper = pbc.sum(axis=1)
    for k in range(3):  # two periodic directions: the unit normal of the periodic pair
        sel = (nper == 2) & ~pbc[:, k]
        if sel.any():
            eff[sel, k] = _unit_np(np.cross(cell[sel, (k + 1) % 3], cell[sel, (k + 2) % 3]))
    for k in range(3):  # one periodic direction a: two unit vectors perpendicular to a and each other
        sel = (nper == 1) & pbc[:, k]
        if sel.any():
            a = cell[sel, k]
            helper = np.eye(3)[np.abs(a).argmin(axis=-1)]
            u = _unit_np(np.cross(a, helper))
            eff[sel, (k + 1) % 3] = u
            eff[sel, (k + 2) % 3] = _unit_np(np.cross(a, u))
    det = np.abs(np.linalg.det(eff)) if B else np.zeros(0)
    scale = np.linalg.norm(eff, axis=-1).prod(axis=-1)
    bad = ~(det > 1e-8 * scale)
    if bad.any():
        g = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"graph {g}: the periodic lattice vectors {cell[g][pbc[g]].tolist()} are zero or linearly "
            "dependent; give a valid cell or set pbc=False in those directions"
        )
    return eff


def effective_cell(cell: Tensor, pbc: Tensor) -> Tensor:
    """Cell whose periodic rows are ``cell``'s and whose non-periodic rows are an orthonormal complement.

    Fractional coordinates along periodic directions are then well defined even when the
    non-periodic lattice vectors are zero (molecules, slabs stored without a c vector).

    Args:
        cell: [B, 3, 3] lattice rows (Å), any float dtype.
        pbc: [B, 3] bool.
    Returns:
        [B, 3, 3] invertible cell, same dtype/device as ``cell``.
    Raises:
        ValueError: when the periodic lattice vectors are zero or linearly dependent.
    """
    eff = _effective_cell_np(_np64(cell), pbc.detach().cpu().numpy().astype(bool))
    return torch.as_tensor(eff, dtype=cell.dtype, device=cell.device)


def _heights_np(cell: np.ndarray) -> np.ndarray:
    vol = np.abs(np.linalg.det(cell))
    areas = np.stack([np.linalg.norm(np.cross(cell[:, (k + 1) % 3], cell[:, (k + 2) % 3]), axis=-1) for k in range(3)], -1)
    return vol[:, None] / areas


def search_geometry(cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> dict[str, np.ndarray]:
    """Everything the periodic search needs from the cells, computed on the host in float64.

    Args:
        cell: [B, 3, 3] float64 lattice rows (Å); pbc: [B, 3] bool; cutoff in Å.
    Returns:
        dict with ``reduced`` [B,3,3] (search lattice, same lattice as ``cell``), ``transform`` [B,3,3]
        int64 (reduced-basis shift -> original-basis shift), ``inv_eff`` [B,3,3] (Cartesian ->
        fractional w.r.t. the effective reduced cell) and ``reach`` [B,3] = cutoff / heights
        (0 where not periodic).
    """
    red, trans = _reduce_cell_np(cell, pbc)
    eff = _effective_cell_np(red, pbc)
    reach = np.where(pbc, cutoff / _heights_np(eff), 0.0)
    return {"reduced": red, "transform": trans, "inv_eff": np.linalg.inv(eff), "reach": reach}


def perpendicular_heights(cell: Tensor) -> Tensor:
    """Distances between opposite faces of each cell: ``h_k = |det| / |a_{k+1} x a_{k+2}|``.

    Args:
        cell: [B, 3, 3] invertible cells (Å).
    Returns:
        [B, 3] heights (Å); ``ceil(cutoff / h_k)`` images per direction suffice for wrapped atoms.
    """
    return torch.as_tensor(_heights_np(_np64(cell)), dtype=cell.dtype, device=cell.device)


def wrap_positions(frac: Tensor, pbc_atom: Tensor) -> tuple[Tensor, Tensor]:
    """Wrap fractional coordinates into [0, 1) along periodic directions.

    Args:
        frac: [N, 3] fractional coordinates (w.r.t. the effective cell).
        pbc_atom: [N, 3] bool, the periodic flags of each atom's graph.
    Returns:
        (wrapped [N, 3], offset [N, 3] long) with ``wrapped = frac - offset``; offset is 0 where not periodic.
    """
    offset = torch.where(pbc_atom, torch.floor(frac), torch.zeros_like(frac))
    return frac - offset, offset.long()
