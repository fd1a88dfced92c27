"""Radius graphs for molecules and periodic systems, in plain torch (CPU and CUDA).

Algorithm (no Python loop over atoms):

1. Per graph, the periodic lattice vectors are reduced (pairwise Gauss reduction, so skewed
   cells need few images) and an *effective cell* (periodic rows = lattice vectors, other rows = orthonormal
   complement) gives fractional coordinates; atoms are wrapped into [0, 1) along periodic
   directions, remembering the integer offsets.
2. Ghost atoms: every atom is replicated at the integer shifts S that bring it within
   ``cutoff`` of the wrapped cell (fractional range ``(-cutoff/h_k, 1 + cutoff/h_k)``, with
   ``h_k`` the perpendicular cell heights), so cutoffs longer than the cell work.
3. Cell list: ghosts are binned into cubes of side cutoff/2 (keys sorted once, no dense grid);
   bins of one (x, y) column have consecutive keys, so each wrapped centre atom finds its
   candidates as 25 contiguous ranges of sorted ghosts with ``searchsorted``. Small graphs use one
   bin per graph, which is the O(N^2) all-pairs search. Centres and candidates are processed in
   blocks, so memory stays bounded.
4. Survivors are re-checked with the exact vector ``pos[j] + shift @ cell - pos[i]`` on the
   ORIGINAL positions (input dtype), shifts being corrected for the wrapping.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .pbc import as_batched_cell_pbc, search_geometry, wrap_positions

__all__ = ["radius_graph", "radius_graph_pbc", "neighbor_search"]

Method = Literal["auto", "cell_list", "brute"]

#: graphs with (atoms x ghost atoms) up to this use a single bin (all pairs)
BRUTE_FORCE_PAIRS = 1 << 17
#: bins per cutoff length in the cell list (bin width = cutoff / BINS_PER_CUTOFF)
BINS_PER_CUTOFF = 2
#: candidate pairs processed at once (bounds memory: ~100 bytes per candidate)
CHUNK_CANDIDATES = 1 << 21
#: the same on CUDA devices (bigger chunks keep the GPU busy)
CHUNK_CANDIDATES_CUDA = 1 << 23
#: (centre, stencil column) entries built at once (CPU / CUDA)
CHUNK_ENTRIES = 1 << 20
CHUNK_ENTRIES_CUDA = 1 << 22
_FRAC_EPS = 1e-6  # fractional margin when choosing ghost shifts
_REL_MARGIN = 1e-5  # relative margin of the candidate filter and bin size; exact check follows
_ULP_MARGIN = 64  # plus this many float eps times the coordinate scale (float32 rounding of ghosts)



def _exclusive_cumsum(x: Tensor) -> Tensor:
    out = torch.zeros_like(x)
    if x.numel() > 1:
        torch.cumsum(x[:-1], dim=0, out=out[1:])
    return out


def _expand_ranges(start: Tensor, count: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """For ranges [start_r, start_r + count_r): (range id of each element, element value)."""
    rid = torch.repeat_interleave(torch.arange(count.numel(), device=count.device), count, output_size=total)
    base = torch.repeat_interleave(start - _exclusive_cumsum(count), count, output_size=total)
    return rid, base + torch.arange(total, device=count.device)


def _check_inputs(pos: Tensor, cutoff: float, batch: Tensor | None) -> tuple[int, Tensor]:
    if not isinstance(pos, Tensor) or pos.dim() != 2 or pos.shape[1] != 3:
        raise ValueError(f"pos must be a tensor of shape [N, 3], got {getattr(pos, 'shape', type(pos))}")
    if not torch.is_floating_point(pos):
        raise ValueError(f"pos must be a float tensor, got {pos.dtype}")
    cutoff = float(cutoff)
    if not (math.isfinite(cutoff) and cutoff > 0):
        raise ValueError(f"cutoff must be a positive finite number of Å, got {cutoff}")
    n = pos.shape[0]
    if batch is None:
        batch = torch.zeros(n, dtype=torch.long, device=pos.device)
    else:
        batch = torch.as_tensor(batch, device=pos.device)
        if batch.dim() != 1 or batch.shape[0] != n:
            raise ValueError(f"batch must have shape [{n}], got {tuple(batch.shape)}")
        batch = batch.long()
        if n and int(batch.min()) < 0:
            raise ValueError("batch holds negative graph indices")
    if n and not bool(torch.isfinite(pos).all()):
        raise ValueError("pos holds non-finite coordinates (NaN or inf)")
    return n, batch


def neighbor_search(
    pos: Tensor,
    cell: Tensor | None,
    pbc: Tensor | None,
    cutoff: float,
    batch: Tensor | None = None,
    method: Method = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """All pairs closer than ``cutoff``; the engine behind :func:`radius_graph_pbc`.

    Args:
        pos: [N, 3] positions (Å), float32 or float64; atoms may lie outside the cell.
        cell: [B, 3, 3] / [3, 3] lattice rows (Å) or None.
        pbc: [B, 3] / [3] bool or None (no periodicity).
        cutoff: radius (Å); pairs with distance < cutoff are returned.
        batch: [N] graph index of each atom (None: one graph).
        method: "auto" (cell lists for large graphs, all pairs for small ones), "cell_list" or "brute".
    Returns:
        (edge_index [2, E] long (row 0 = neighbour j, row 1 = centre i), shift [E, 3] long,
        distance [E] in pos.dtype), sorted by (i, j, shift).
    """
    if method not in ("auto", "cell_list", "brute"):
        raise ValueError(f"method must be 'auto', 'cell_list' or 'brute', got {method!r}")
    n, batch = _check_inputs(pos, cutoff, batch)
    cutoff = float(cutoff)
    device, dtype = pos.device, pos.dtype
    if cell is not None and torch.as_tensor(cell).dim() == 3:
        num_graphs = torch.as_tensor(cell).shape[0]
        if n and int(batch.max()) >= num_graphs and num_graphs != 1:
            raise ValueError(f"batch refers to graph {int(batch.max())} but cell holds {num_graphs} cells")
        num_graphs = max(num_graphs, int(batch.max()) + 1 if n else 0)
    else:
        num_graphs = int(batch.max()) + 1 if n else 1
    cell, pbc = as_batched_cell_pbc(cell, pbc, num_graphs, device, dtype)
    cell = cell.to(dtype)
    empty = (
        torch.zeros(2, 0, dtype=torch.long, device=device),
        torch.zeros(0, 3, dtype=torch.long, device=device),
        torch.zeros(0, dtype=dtype, device=device),
    )
    if n == 0:
        return empty

    with torch.no_grad():
        pos = pos.detach()
        cell = cell.detach()
        # --- 1. the per-graph cell algebra ([B, 3, 3]) runs on the host in float64 (tiny; no kernel launches)
        pbc_h = pbc.cpu().numpy()
        transform = None  # [B, 3, 3] long: reduced-basis shifts -> original-basis shifts
        search_cell = cell  # lattice used for the search (reduced where that helps)
        if pbc_h.any():
            geo = search_geometry(cell.to("cpu", torch.float64).numpy(), pbc_h, cutoff)
            B = num_graphs
            packed = np.concatenate(
                [geo["inv_eff"].reshape(B, 9), geo["reach"], geo["reduced"].reshape(B, 9), geo["transform"].reshape(B, 9)],
                axis=1,
            )
            packed_d = torch.from_numpy(packed).to(device)  # one host-to-device copy
            inv_eff, reach_g = packed_d[:, :9].reshape(B, 3, 3), packed_d[:, 9:12]
            if not (geo["transform"] == np.eye(3, dtype=np.int64)).all():
                search_cell = packed_d[:, 12:21].reshape(B, 3, 3).to(dtype)
                transform = packed_d[:, 21:30].reshape(B, 3, 3).round().long()
            # fractional coordinates, wrapping into [0, 1) along periodic directions
            frac = torch.einsum("nk,nkl->nl", pos.double(), inv_eff[batch])
            pbc_atom = pbc[batch]
            fw, off = wrap_positions(frac, pbc_atom)
            reach = reach_g[batch]  # [N, 3], 0 where not periodic
            lo = torch.where(pbc_atom, torch.ceil(-reach - _FRAC_EPS - fw), 0.0).long()
            hi = torch.where(pbc_atom, torch.floor(1.0 + reach + _FRAC_EPS - fw), 0.0).long()

            # --- 2. ghost atoms (atom index, wrapped-frame shift S, Cartesian position)
            span = hi - lo + 1  # [N, 3]
            gcount = span.prod(dim=1)
            G = int(gcount.sum())
            gatom, t = _expand_ranges(torch.zeros_like(gcount), gcount, G)
            sp = span[gatom]
            s2 = t % sp[:, 2]
            s1 = (t // sp[:, 2]) % sp[:, 1]
            s0 = t // (sp[:, 2] * sp[:, 1])
            gS = lo[gatom] + torch.stack([s0, s1, s2], dim=1)  # [G, 3]
            gbatch = batch[gatom]
            wrapped = bool((off != 0).any())
            has_shift = True
            gpos = pos[gatom] + torch.einsum("gk,gkl->gl", (gS - off[gatom]).to(dtype), search_cell[gbatch])
            cpos = pos - torch.einsum("nk,nkl->nl", off.to(dtype), search_cell[batch])
        else:  # molecules only: the atoms are their own (only) ghosts
            G = n
            gatom = torch.arange(n, device=device)
            off = gS = torch.zeros(n, 3, dtype=torch.long, device=device)
            gbatch = batch
            wrapped = has_shift = False
            gpos = cpos = pos

        # candidate filter / bins use cutoff + margin: ghost positions round differently from the exact check
        scale = max(1.0, float(gpos.abs().max())) if G else 1.0
        cut_search = cutoff * (1 + _REL_MARGIN) + _ULP_MARGIN * torch.finfo(dtype).eps * scale

        # --- 3. bins: one per graph (all pairs) or cubes of side cutoff / BINS_PER_CUTOFF
        natoms = torch.bincount(batch, minlength=num_graphs)
        nghost = torch.bincount(gbatch, minlength=num_graphs)
        if method == "brute":
            use_cells = torch.zeros(num_graphs, dtype=torch.bool, device=device)
        elif method == "cell_list":
            use_cells = natoms > 0
        else:
            use_cells = natoms * nghost > BRUTE_FORCE_PAIRS
        any_cells = bool(use_cells.any())
        m = BINS_PER_CUTOFF if any_cells else 1
        if any_cells:
            big = torch.finfo(dtype).max
            idx3 = gbatch.unsqueeze(1).expand(-1, 3)
            lo_b = torch.full((num_graphs, 3), big, dtype=dtype, device=device).scatter_reduce(0, idx3, gpos, "amin")
            hi_b = torch.full((num_graphs, 3), -big, dtype=dtype, device=device).scatter_reduce(0, idx3, gpos, "amax")
            has = (natoms > 0).unsqueeze(1)
            extent = torch.where(has, (hi_b - lo_b).clamp_min(0), torch.zeros_like(hi_b))
            lo_b = torch.where(has, lo_b, torch.zeros_like(lo_b))
            # bin width >= cut_search / m; at most 2**15 bins per direction
            binsize = torch.clamp(extent.amax(dim=1) / 2**15, min=cut_search / m)  # [B]
            dims = (torch.floor(extent / binsize.unsqueeze(1)).long() + 1).clamp_min(1)
            dims = torch.where(use_cells.unsqueeze(1), dims, torch.ones_like(dims))

            def bin_of(p: Tensor, b: Tensor) -> Tensor:
                ijk = torch.floor((p - lo_b[b]) / binsize[b].unsqueeze(1)).long()
                return torch.minimum(ijk.clamp_min(0), dims[b] - 1)

            gijk = bin_of(gpos, gbatch)
            cijk = bin_of(cpos, batch)
            graph_base = _exclusive_cumsum(dims.prod(dim=1))

            def key_of(ijk: Tensor, b: Tensor) -> Tensor:
                d = dims[b]
                return graph_base[b] + (ijk[:, 0] * d[:, 1] + ijk[:, 1]) * d[:, 2] + ijk[:, 2]

            gkey, order = torch.sort(key_of(gijk, gbatch), stable=True)
            gpos, gatom, gS = gpos[order], gatom[order], gS[order]
            corder = torch.sort(key_of(cijk, batch), stable=True).indices  # centres in bin order (locality)
            cols = torch.tensor(_stencil(m), dtype=torch.long, device=device)  # [C, 3]
        else:
            # all pairs within each graph: the candidates of a centre are all ghosts of its graph
            if G > 1 and not bool((gbatch[1:] >= gbatch[:-1]).all()):
                order = torch.sort(gbatch, stable=True).indices
                gpos, gatom, gS = gpos[order], gatom[order], gS[order]
            gfirst = _exclusive_cumsum(nghost)
            corder = torch.arange(n, device=device)
            cols = torch.zeros(1, 3, dtype=torch.long, device=device)

        # --- 4. candidate ranges of sorted ghosts, per block of centres. Cell lists: bins of one (x, y)
        # column are consecutive keys, so each stencil column (dx, dy, |dz| <= h) is one contiguous
        # range. All pairs: one range per centre, the ghosts of its graph.
        on_cuda = device.type == "cuda"
        block = max(1, (CHUNK_ENTRIES_CUDA if on_cuda else CHUNK_ENTRIES) // cols.shape[0])
        chunk = CHUNK_CANDIDATES_CUDA if on_cuda else CHUNK_CANDIDATES
        out_i, out_j, out_s, out_d = [], [], [], []
        for b0 in range(0, n, block):
            cidx = corder[b0 : b0 + block]
            if any_cells:
                start, count = _column_ranges(cijk[cidx], dims[batch[cidx]], graph_base[batch[cidx]], cols, gkey)
                centre = cidx.repeat_interleave(cols.shape[0])
                nz = (count > 0).nonzero().squeeze(1)
                start, count, centre = start[nz], count[nz], centre[nz]
            else:
                start, count, centre = gfirst[batch[cidx]], nghost[batch[cidx]], cidx

            # --- 5. chunked expansion, loose filter on ghost positions, exact check on original positions
            cut_loose = cut_search**2
            one_cell = cell[0] if num_graphs == 1 else None
            csum = torch.cumsum(count, dim=0)
            pos_entry = 0
            num_entries = count.numel()
            while pos_entry < num_entries:
                base = int(csum[pos_entry - 1]) if pos_entry > 0 else 0
                end_entry = int(torch.searchsorted(csum, base + chunk, right=True))
                end_entry = max(end_entry, pos_entry + 1)
                st, ct = start[pos_entry:end_entry], count[pos_entry:end_entry]
                tot = int(csum[end_entry - 1]) - base
                ci = torch.repeat_interleave(centre[pos_entry:end_entry], ct, output_size=tot)
                gi = torch.repeat_interleave(st - (csum[pos_entry:end_entry] - ct - base), ct, output_size=tot)
                gi += torch.arange(tot, device=device)
                d = gpos.index_select(0, gi)
                d -= cpos.index_select(0, ci)
                d.mul_(d)
                keep = (d.sum(dim=1) < cut_loose).nonzero().squeeze(1)
                del d
                ci, gi = ci.index_select(0, keep), gi.index_select(0, keep)
                j = gatom.index_select(0, gi)
                shift = gS.index_select(0, gi)
                if wrapped:
                    shift = shift - off[j] + off[ci]
                if transform is not None:
                    shift = (shift.unsqueeze(-1) * transform[batch[j]]).sum(dim=1)
                vec = pos[j] - pos[ci]
                if has_shift:
                    if one_cell is not None:
                        vec += shift.to(dtype) @ one_cell
                    else:
                        vec += torch.einsum("ek,ekl->el", shift.to(dtype), cell[batch[j]])
                dist = torch.linalg.vector_norm(vec, dim=1)
                keep = ((dist < cutoff) & ~((j == ci) & (shift == 0).all(dim=1))).nonzero().squeeze(1)
                out_i.append(ci[keep])
                out_j.append(j[keep])
                out_s.append(shift[keep])
                out_d.append(dist[keep])
                pos_entry = end_entry
        if not out_i:
            return empty
        i = torch.cat(out_i)
        del out_i
        j = torch.cat(out_j)
        del out_j
        perm = _sort_edges(i, j, out_s, n)
        i, j = i[perm], j[perm]
        edge_index = torch.stack([j, i])
        del i, j
        shift = torch.cat(out_s)[perm]
        del out_s
        dist = torch.cat(out_d)[perm]
        return edge_index, shift, dist


def _column_ranges(
    cijk: Tensor, cdims: Tensor, cbase: Tensor, cols: Tensor, gkey: Tensor
) -> tuple[Tensor, Tensor]:
    """Ranges [start, start + count) of sorted ghosts in each stencil column around each centre.

    Args:
        cijk: [n, 3] bin of each centre; cdims: [n, 3] its graph's grid; cbase: [n] its graph's first key;
        cols: [C, 3] stencil columns (dx, dy, h); gkey: [G] sorted ghost bin keys.
    Returns:
        (start [n * C], count [n * C]) with count 0 for columns outside the grid.
    """
    cd = cdims.unsqueeze(1)  # [n, 1, 3]
    xy = cijk[:, None, :2] + cols[None, :, :2]  # [n, C, 2]
    valid = ((xy >= 0) & (xy < cd[..., :2])).all(dim=-1)
    xy = torch.minimum(xy.clamp_min(0), cd[..., :2] - 1)
    z0 = (cijk[:, 2:3] - cols[None, :, 2]).clamp_min(0)
    z1 = torch.minimum(cijk[:, 2:3] + cols[None, :, 2], cd[..., 2] - 1)
    colkey = cbase.unsqueeze(1) + (xy[..., 0] * cd[..., 1] + xy[..., 1]) * cd[..., 2]
    start = torch.searchsorted(gkey, (colkey + z0).reshape(-1), right=False)
    end = torch.searchsorted(gkey, (colkey + z1).reshape(-1), right=True)
    count = torch.where(valid.reshape(-1), end - start, torch.zeros_like(start))
    return start, count


def _stencil(m: int) -> list[tuple[int, int, int]]:
    """Columns (dx, dy, h) of bins (width cutoff/m) that can hold points within cutoff of a bin.

    A bin at offset (dx, dy, dz) is needed when sum_k max(|d_k| - 1, 0)^2 < m^2; for each (dx, dy)
    this holds for |dz| <= h.
    """
    cols = []
    for dx in range(-m, m + 1):
        for dy in range(-m, m + 1):
            r2 = max(abs(dx) - 1, 0) ** 2 + max(abs(dy) - 1, 0) ** 2
            if r2 >= m * m:
                continue
            h = 0
            while max(h, 0) ** 2 + r2 < m * m:  # (|dz| - 1)^2 + r2 < m^2 with |dz| = h + 1
                h += 1
            cols.append((dx, dy, h))
    return cols


def _sort_edges(i: Tensor, j: Tensor, shifts: list[Tensor], n: int) -> Tensor:
    """Permutation that orders edges by (i, j, shift) lexicographically (shift given in chunks)."""
    if i.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=i.device)
    m = max(max(int(s.amax()), -int(s.amin())) for s in shifts if s.numel())
    w = 2 * m + 1
    code = torch.cat([((s[:, 0] + m) * w + (s[:, 1] + m)) * w + (s[:, 2] + m) for s in shifts])
    if n * n * w**3 < 2**62:
        code += (i * n + j) * w**3
        return torch.sort(code).indices
    perm = torch.sort(code, stable=True).indices
    perm = perm[torch.sort((i * n + j)[perm], stable=True).indices]
    return perm


def _limit_neighbors(edge_index: Tensor, dist: Tensor, k: int) -> Tensor:
    """Boolean mask keeping, for each centre, its ``k`` nearest neighbours (ties by edge order)."""
    i = edge_index[1]
    e = i.numel()
    perm = torch.sort(dist, stable=True).indices
    perm = perm[torch.sort(i[perm], stable=True).indices]
    first = _exclusive_cumsum(torch.bincount(i, minlength=int(i.max()) + 1 if e else 0))
    rank = torch.arange(e, device=i.device) - first[i[perm]]
    mask = torch.zeros(e, dtype=torch.bool, device=i.device)
    mask[perm[rank < k]] = True
    return mask


def radius_graph_pbc(
    pos: Tensor,
    cell: Tensor | None,
    pbc: Tensor | None,
    cutoff: float,
    batch: Tensor | None = None,
    *,
    max_num_neighbors: int | None = None,
    method: Method = "auto",
) -> tuple[Tensor, Tensor]:
    """Neighbour list with periodic images.

    Args:
        pos: [N, 3] Cartesian positions (Å), float32/float64; atoms may lie outside the cell.
        cell: [B, 3, 3] (or [3, 3]) lattice vectors as rows (Å); rows of non-periodic directions are ignored.
        pbc: [B, 3] (or [3]) bool periodic directions.
        cutoff: pairs with distance < cutoff (Å) are edges; may exceed the cell size.
        batch: [N] graph index of each atom (None: a single graph).
        max_num_neighbors: keep only this many nearest neighbours per centre (None: all).
        method: "auto", "cell_list" or "brute" (all pairs); all give the same edges.
    Returns:
        edge_index [2, E] long: row 0 = neighbour j (source), row 1 = centre i (target);
        shift [E, 3] long: integer image offsets with ``vec_ij = pos[j] + shift @ cell[batch[j]] - pos[i]``.
        Both directions of every pair, no self pair at zero shift (self images at non-zero shift are
        included), sorted by (i, j, shift).
    """
    edge_index, shift, dist = neighbor_search(pos, cell, pbc, cutoff, batch, method)
    if max_num_neighbors is not None and edge_index.shape[1]:
        mask = _limit_neighbors(edge_index, dist, int(max_num_neighbors))
        edge_index, shift = edge_index[:, mask], shift[mask]
    return edge_index, shift


def radius_graph(
    pos: Tensor,
    cutoff: float,
    batch: Tensor | None = None,
    max_num_neighbors: int | None = None,
    *,
    method: Method = "auto",
) -> Tensor:
    """Neighbour list of non-periodic systems (molecules, point clouds).

    Args:
        pos: [N, 3] positions (Å).
        cutoff: pairs with distance < cutoff (Å) are edges.
        batch: [N] graph index of each atom (None: one graph); pairs never cross graphs.
        max_num_neighbors: keep only this many nearest neighbours per centre (None: all).
    Returns:
        edge_index [2, E]: row 0 = neighbour j (source), row 1 = centre i (target), sorted by (i, j).
    """
    edge_index, _ = radius_graph_pbc(pos, None, None, cutoff, batch, max_num_neighbors=max_num_neighbors, method=method)
    return edge_index
