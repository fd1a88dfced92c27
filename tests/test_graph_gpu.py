"""Neighbour lists on CUDA equal the CPU ones (needs only torch + numpy: runs on GPU boxes without ASE).

Run on a GPU machine with ``python -m pytest tests/test_graph_gpu.py -m gpu -q``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from equiformer.graph import build_edges, radius_graph_pbc, radius_graph_pbc_reference
from equiformer.graph.bench import make_system

pytestmark = pytest.mark.gpu

METHODS = ("brute", "cell_list", "auto")


def _require_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def _random_cell_system(n: int, density: float, seed: int, pbc=(True, True, True)):
    rng = np.random.default_rng(seed)
    shape = np.array([[1.0, 0.0, 0.0], [0.45, 0.89, 0.0], [-0.3, 0.35, 0.88]])
    cell = shape * (n / density / abs(np.linalg.det(shape))) ** (1 / 3)
    frac = rng.random((n, 3))
    frac[: max(1, n // 20)] += rng.integers(-2, 3, size=(max(1, n // 20), 3))  # outside the cell
    return frac @ cell, cell, np.array(pbc)


def _mixed_batch(dtype):
    systems = [
        _random_cell_system(7, 0.05, 0),  # tiny cell, cutoff >> cell: many images
        _random_cell_system(40, 0.06, 1, pbc=(True, True, False)),  # slab-like
        (make_system("cluster", 30).positions, np.zeros((3, 3)), np.zeros(3, dtype=bool)),  # molecule
        _random_cell_system(500, 0.08, 2),
        (make_system("Si-diamond", 64).positions, make_system("Si-diamond", 64).cell, np.ones(3, dtype=bool)),
        _random_cell_system(3, 0.02, 3, pbc=(False, False, True)),  # wire
    ]
    pos = torch.tensor(np.concatenate([s[0] for s in systems]), dtype=dtype)
    cell = torch.tensor(np.stack([s[1] for s in systems]), dtype=dtype)
    pbc = torch.tensor(np.stack([s[2] for s in systems]))
    batch = torch.cat([torch.full((len(s[0]),), k) for k, s in enumerate(systems)])
    return pos, cell, pbc, batch


def test_cuda_matches_cpu_and_reference_on_mixed_batch():
    _require_cuda()
    for dtype in (torch.float64, torch.float32):
        pos, cell, pbc, batch = _mixed_batch(dtype)
        ref_ei, ref_shift, _ = radius_graph_pbc_reference(pos.double(), cell.double(), pbc, 5.3, batch)
        for method in METHODS:
            a = radius_graph_pbc(pos, cell, pbc, 5.3, batch, method=method)
            b = radius_graph_pbc(pos.cuda(), cell.cuda(), pbc.cuda(), 5.3, batch.cuda(), method=method)
            assert b[0].is_cuda and b[1].is_cuda
            assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu()), (dtype, method)
            if dtype == torch.float64:
                assert torch.equal(a[0], ref_ei) and torch.equal(a[1], ref_shift), method


def test_cuda_large_system_matches_cpu():
    _require_cuda()
    pos, cell, pbc = _random_cell_system(200_000, 0.08, 4)
    pos, cell, pbc = torch.tensor(pos), torch.tensor(cell), torch.tensor(pbc)
    a = radius_graph_pbc(pos, cell, pbc, 5.0)
    b = radius_graph_pbc(pos.cuda(), cell.cuda(), pbc.cuda(), 5.0)
    assert a[0].shape[1] > 5_000_000
    assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())


def test_cuda_build_edges_gradients():
    _require_cuda()
    from torch_geometric.data import Data

    pos, cell, pbc, batch = _mixed_batch(torch.float64)
    data = Data(pos=pos.cuda().requires_grad_(True), cell=cell.cuda(), pbc=pbc.cuda(), batch=batch.cuda())
    _, vec = build_edges(data, 4.0)
    e = vec.norm(dim=1).sum()
    (g,) = torch.autograd.grad(e, data.pos)
    data_cpu = Data(pos=pos.clone().requires_grad_(True), cell=cell, pbc=pbc, batch=batch)
    _, vec_cpu = build_edges(data_cpu, 4.0)
    (g_cpu,) = torch.autograd.grad(vec_cpu.norm(dim=1).sum(), data_cpu.pos)
    assert torch.allclose(g.cpu(), g_cpu, atol=1e-10)
