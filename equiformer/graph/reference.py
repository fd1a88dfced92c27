"""A deliberately simple O(N^2 x images) neighbour list, for testing the fast path.

Loops over graphs (not atoms); no wrapping, no bins. Use only for small systems.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from .pbc import as_batched_cell_pbc, effective_cell, perpendicular_heights

__all__ = ["radius_graph_pbc_reference"]


def radius_graph_pbc_reference(
    pos: Tensor, cell: Tensor | None, pbc: Tensor | None, cutoff: float, batch: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as :func:`equiformer.graph.radius_graph_pbc`, plus distances [E].

    For each graph, every shift S with ``|S_k| <= ceil(cutoff/h_k + span_k)`` (``span_k`` = extent of the
    atoms' fractional coordinates) is tried against every atom pair.
    """
    n = pos.shape[0]
    if batch is None:
        batch = torch.zeros(n, dtype=torch.long, device=pos.device)
    num_graphs = int(batch.max()) + 1 if n else 1
    if cell is not None and torch.as_tensor(cell).dim() == 3:
        num_graphs = max(num_graphs, torch.as_tensor(cell).shape[0])
    cell, pbc = as_batched_cell_pbc(cell, pbc, num_graphs, pos.device, pos.dtype)
    cell = cell.to(pos.dtype)
    ii, jj, ss, dd = [], [], [], []
    for b in range(num_graphs):
        idx = (batch == b).nonzero().flatten()
        if idx.numel() == 0:
            continue
        p = pos[idx]
        ranges = []
        if bool(pbc[b].any()):
            eff = effective_cell(cell[b : b + 1].double(), pbc[b : b + 1])
            h = perpendicular_heights(eff)[0]
            frac = p.double() @ torch.linalg.inv(eff[0])
            span = frac.max(0).values - frac.min(0).values
        for k in range(3):
            if bool(pbc[b, k]):
                m = math.ceil(cutoff / float(h[k]) + float(span[k]))
                ranges.append(range(-m, m + 1))
            else:
                ranges.append(range(0, 1))
        shifts = torch.tensor(list(itertools.product(*ranges)), dtype=torch.long, device=pos.device)  # [S, 3]
        tvec = shifts.to(pos.dtype) @ cell[b]  # [S, 3]
        # vec[s, i, j] = p[j] + t[s] - p[i]
        vec = p.unsqueeze(0).unsqueeze(0) + tvec.unsqueeze(1).unsqueeze(1) - p.unsqueeze(1).unsqueeze(0)
        dist = torch.linalg.vector_norm(vec, dim=-1)
        m = len(idx)
        eye = torch.eye(m, dtype=torch.bool, device=pos.device).unsqueeze(0)
        zero = (shifts == 0).all(dim=1).view(-1, 1, 1)
        keep = (dist < cutoff) & ~(eye & zero)
        s_, i_, j_ = keep.nonzero(as_tuple=True)
        ii.append(idx[i_])
        jj.append(idx[j_])
        ss.append(shifts[s_])
        dd.append(dist[s_, i_, j_])
    if not ii:
        z = torch.zeros(0, dtype=torch.long, device=pos.device)
        return torch.stack([z, z]), torch.zeros(0, 3, dtype=torch.long, device=pos.device), pos.new_zeros(0)
    i, j, s, d = torch.cat(ii), torch.cat(jj), torch.cat(ss), torch.cat(dd)
    m = int(s.abs().max()) if s.numel() else 0
    w = 2 * m + 1
    key = ((i * n + j) * w + (s[:, 0] + m)) * w * w + (s[:, 1] + m) * w + (s[:, 2] + m)
    perm = torch.sort(key).indices
    return torch.stack([j[perm], i[perm]]), s[perm], d[perm]
