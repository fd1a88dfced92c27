"""Edges of a PyG ``Data``/``Batch`` of molecules and/or crystals, with differentiable edge vectors."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .radius import Method, radius_graph_pbc

__all__ = ["build_edges", "edge_vectors"]


def edge_vectors(pos: Tensor, edge_index: Tensor, shift: Tensor, cell: Tensor, batch: Tensor) -> Tensor:
    """``vec_ij = pos[j] + shift @ cell[batch[j]] - pos[i]`` for every edge (Å), differentiable in pos and cell.

    Args:
        pos: [N, 3]; edge_index: [2, E] (row 0 = j, row 1 = i); shift: [E, 3] long;
        cell: [B, 3, 3]; batch: [N].
    Returns:
        [E, 3] in pos.dtype.
    """
    j, i = edge_index[0], edge_index[1]
    vec = pos[j] - pos[i]
    if shift.numel() and bool((shift != 0).any()):
        vec = vec + torch.einsum("ek,ekl->el", shift.to(pos.dtype), cell.to(pos.dtype)[batch[j]])
    return vec


def build_edges(
    data: Any, cutoff: float, *, max_num_neighbors: int | None = None, return_shift: bool = False, method: Method = "auto"
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Radius graph of a PyG ``Data``/``Batch`` (molecules and crystals mixed).

    Uses ``data.pos`` [N, 3] Å, ``data.cell`` [B, 3, 3] Å and ``data.pbc`` [B, 3] (absent: a molecule),
    ``data.batch`` [N] (absent: one graph). Molecules (pbc all False) get no images.

    Returns:
        edge_index [2, E] (row 0 = neighbour j, row 1 = centre i) and edge_vec [E, 3] =
        ``pos[j] + shift @ cell[batch[j]] - pos[i]`` (Å), differentiable w.r.t. ``data.pos`` and
        ``data.cell`` so that forces = -dE/dpos work; plus shift [E, 3] long if ``return_shift``.
    """
    pos = getattr(data, "pos", None)
    if pos is None:
        raise ValueError("build_edges: data has no 'pos' field")
    n = pos.shape[0]
    batch = getattr(data, "batch", None)
    if batch is None:
        batch = torch.zeros(n, dtype=torch.long, device=pos.device)
    cell = getattr(data, "cell", None)
    pbc = getattr(data, "pbc", None)
    num_graphs = int(batch.max()) + 1 if n else 1
    if cell is None:
        cell = torch.zeros(num_graphs, 3, 3, dtype=pos.dtype, device=pos.device)
    if cell.dim() == 2:
        cell = cell.unsqueeze(0)
    if cell.shape[0] == 1 and num_graphs > 1:
        cell = cell.expand(num_graphs, 3, 3)
    edge_index, shift = radius_graph_pbc(
        pos.detach(), cell.detach(), pbc, cutoff, batch, max_num_neighbors=max_num_neighbors, method=method
    )
    vec = edge_vectors(pos, edge_index, shift, cell, batch)
    if return_shift:
        return edge_index, vec, shift
    return edge_index, vec
