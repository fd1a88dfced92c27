"""Cell and periodic-boundary helpers for neighbour search.

All functions are batched over graphs: ``cell`` is ``[B, 3, 3]`` (lattice vectors as rows, Å),
``pbc`` is ``[B, 3]`` bool. Non-periodic directions never receive periodic images; their lattice
vector may be anything (zeros for molecules).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["as_batched_cell_pbc", "effective_cell", "perpendicular_heights", "reduce_cell", "wrap_positions"]


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


def reduce_cell(cell: Tensor, pbc: Tensor, max_iter: int = 100) -> tuple[Tensor, Tensor]:
    """Pairwise (Gauss) reduction of the periodic lattice vectors, batched over graphs.

    Repeats ``a_k -= round(a_k.a_l / a_l.a_l) a_l`` over pairs of periodic directions until no
    vector shortens. The lattice is unchanged, but a strongly skewed cell becomes a compact one whose
    perpendicular heights are close to its vector lengths, so far fewer periodic images are needed.

    Args:
        cell: [B, 3, 3] lattice rows (float64 recommended).
        pbc: [B, 3] bool; non-periodic rows are left alone.
    Returns:
        (reduced [B, 3, 3], M [B, 3, 3] long) with ``reduced = M @ cell`` and ``det M = +-1``. An image
        shift ``s`` in the reduced basis is ``s @ M`` in the original one.
    """
    red = cell.clone()
    B = cell.shape[0]
    trans = torch.eye(3, dtype=cell.dtype, device=cell.device).repeat(B, 1, 1)
    pairs = [(k, l) for k in range(3) for l in range(3) if k != l]
    both = {(k, l): pbc[:, k] & pbc[:, l] for k, l in pairs}
    if not any(bool(v.any()) for v in both.values()):
        return red, trans.long()
    for _ in range(max_iter):
        changed = torch.zeros((), dtype=torch.bool, device=cell.device)
        for k, l in pairs:
            num = (red[:, k] * red[:, l]).sum(-1)
            den = (red[:, l] * red[:, l]).sum(-1)
            q = torch.round(num / den.clamp_min(1e-300))
            q = torch.where(both[(k, l)] & torch.isfinite(q) & (den > 0), q, torch.zeros_like(q))
            red[:, k] -= q.unsqueeze(-1) * red[:, l]
            trans[:, k] -= q.unsqueeze(-1) * trans[:, l]
            changed |= (q != 0).any()
        if not bool(changed):
            break
    return red, trans.round().long()


def _unit(v: Tensor) -> Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-300)


def effective_cell(cell: Tensor, pbc: Tensor) -> Tensor:
    """Cell whose periodic rows are ``cell``'s and whose non-periodic rows are an orthonormal complement.

    Fractional coordinates along periodic directions are then well defined even when the
    non-periodic lattice vectors are zero (molecules, slabs stored without a c vector).

    Args:
        cell: [B, 3, 3] lattice rows (Å), any float dtype.
        pbc: [B, 3] bool.
    Returns:
        [B, 3, 3] invertible cell, same dtype as ``cell``.
    Raises:
        ValueError: when the periodic lattice vectors are zero or linearly dependent.
    """
    B = cell.shape[0]
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand(B, 3, 3)
    eff = torch.where(pbc.unsqueeze(-1), cell, eye)  # start: periodic rows kept
    nper = pbc.sum(dim=1)

    # two periodic directions: the missing row is the unit normal of the two periodic ones
    for k in range(3):
        a, b = cell[:, (k + 1) % 3], cell[:, (k + 2) % 3]
        normal = _unit(torch.linalg.cross(a, b))
        sel = (nper == 2) & ~pbc[:, k]
        eff[:, k] = torch.where(sel.unsqueeze(-1), normal, eff[:, k])

    # one periodic direction a: the other two rows are unit vectors perpendicular to a and each other
    for k in range(3):
        sel = (nper == 1) & pbc[:, k]
        if not bool(sel.any()):
            continue
        a = cell[:, k]
        helper = torch.nn.functional.one_hot(a.abs().argmin(dim=-1), 3).to(cell.dtype)
        u = _unit(torch.linalg.cross(a, helper))
        w = _unit(torch.linalg.cross(a, u))
        eff[:, (k + 1) % 3] = torch.where(sel.unsqueeze(-1), u, eff[:, (k + 1) % 3])
        eff[:, (k + 2) % 3] = torch.where(sel.unsqueeze(-1), w, eff[:, (k + 2) % 3])

    det = torch.linalg.det(eff).abs()
    scale = torch.linalg.vector_norm(eff, dim=-1).prod(dim=-1)
    bad = ~(det > 1e-8 * scale)
    if bool(bad.any()):
        g = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"graph {g}: the periodic lattice vectors {cell[g][pbc[g]].tolist()} are zero or linearly "
            "dependent; give a valid cell or set pbc=False in those directions"
        )
    return eff


def perpendicular_heights(cell: Tensor) -> Tensor:
    """Distances between opposite faces of each cell: ``h_k = |det| / |a_{k+1} x a_{k+2}|``.

    Args:
        cell: [B, 3, 3] invertible cells (Å).
    Returns:
        [B, 3] heights (Å); ``ceil(cutoff / h_k)`` images per direction suffice for wrapped atoms.
    """
    vol = torch.linalg.det(cell).abs()
    areas = torch.stack(
        [torch.linalg.vector_norm(torch.linalg.cross(cell[:, (k + 1) % 3], cell[:, (k + 2) % 3]), dim=-1) for k in range(3)],
        dim=-1,
    )
    return vol.unsqueeze(-1) / areas


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
