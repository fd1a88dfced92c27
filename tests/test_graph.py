"""Neighbour lists (equiformer.graph) against ASE and pymatgen on real molecules and crystals.

Every comparison is on the full edge set (i, j, shift) and the distances (to 1e-6 Å), in float64
unless stated otherwise, for the all-pairs path ("brute"), the cell-list path and "auto".
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111
from ase.neighborlist import neighbor_list
from pymatgen.core import Lattice, Structure
from pymatgen.io.ase import AseAtomsAdaptor
from torch_geometric.data import Batch, Data

from equiformer.graph import (
    build_edges,
    neighbor_search,
    radius_graph,
    radius_graph_pbc,
    radius_graph_pbc_reference,
)

METHODS = ("brute", "cell_list", "auto")
SHARED_DATA = Path(os.environ.get("EQUIFORMER_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


# ----------------------------------------------------------------------------- helpers


def _tensors(atoms: Atoms, dtype=torch.float64):
    return (
        torch.tensor(atoms.positions, dtype=dtype),
        torch.tensor(np.array(atoms.cell), dtype=dtype),
        torch.tensor(atoms.pbc),
    )


def _ours(atoms: Atoms, cutoff: float, method: str = "auto", dtype=torch.float64) -> dict:
    """{(i, j, shift): distance} from radius_graph_pbc, distances from the contract's vec formula."""
    pos, cell, pbc = _tensors(atoms, dtype)
    edge_index, shift = radius_graph_pbc(pos, cell, pbc, cutoff, method=method)
    assert edge_index.dtype == torch.long and shift.dtype == torch.long
    j, i = edge_index
    vec = pos[j] + shift.to(dtype) @ cell - pos[i]
    d = vec.norm(dim=1).tolist()
    return {(a, b, tuple(s)): x for a, b, s, x in zip(i.tolist(), j.tolist(), shift.tolist(), d)}


def _ase(atoms: Atoms, cutoff: float) -> dict:
    i, j, d, S = neighbor_list("ijdS", atoms, cutoff)
    return {(a, b, tuple(s)): x for a, b, s, x in zip(i.tolist(), j.tolist(), S.tolist(), d.tolist())}


def _pymatgen(structure: Structure, cutoff: float) -> dict:
    i, j, S, d = structure.get_neighbor_list(cutoff)
    return {(a, b, tuple(int(v) for v in s)): x for a, b, s, x in zip(i.tolist(), j.tolist(), S.tolist(), d.tolist())}


def _assert_same(ours: dict, ref: dict, what: str) -> None:
    missing = set(ref) - set(ours)
    extra = set(ours) - set(ref)
    assert not missing and not extra, f"{what}: {len(missing)} missing, {len(extra)} extra edges; e.g. {sorted(missing | extra)[:3]}"
    err = max((abs(ours[k] - ref[k]) for k in ref), default=0.0)
    assert err < 1e-6, f"{what}: distance error {err}"


def _check_all(atoms: Atoms, cutoff: float, structure: Structure | None = None, what: str = "") -> dict:
    """Ours (all methods) == ASE, and == pymatgen if a Structure is given; returns ASE's edges."""
    wide = _ase(atoms, cutoff + 1e-3)
    # the comparison is only meaningful if no distance sits on the cutoff
    assert not any(abs(d - cutoff) < 1e-5 for d in wide.values()), "pick another cutoff: a distance equals it"
    ref = {k: d for k, d in wide.items() if d < cutoff}
    assert len(ref) > 0
    for method in METHODS:
        _assert_same(_ours(atoms, cutoff, method), ref, f"{what} {method} vs ASE (cutoff {cutoff})")
    if structure is not None:
        _assert_same(_ours(atoms, cutoff), _pymatgen(structure, cutoff), f"{what} vs pymatgen (cutoff {cutoff})")
    return ref


# ----------------------------------------------------------------------------- real structures


def _qm9_molecules(count: int = 6) -> list[Atoms]:
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qm9pack is not installed")
    import pandas as pd

    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "qm9_part1.csv"
    df = pd.read_csv(path, nrows=400, usecols=["Index", "N_atoms", "Elements", "XYZ_Ang"])
    df = pd.concat([df.head(2), df.sort_values(["N_atoms", "Index"], ascending=[False, True]).head(count - 2)])
    mols = []
    for _, row in df.iterrows():
        symbols = ast.literal_eval(row["Elements"])
        xyz = np.array(ast.literal_eval(row["XYZ_Ang"]), dtype=float)
        assert xyz.shape == (len(symbols), 3)
        mols.append(Atoms(symbols, positions=xyz))
    return mols


def _triclinic_mp() -> Structure:
    path = SHARED_DATA / "materials_project" / "flla_2015.csv"
    if not path.exists():
        pytest.skip(f"{path} not found (set EQUIFORMER_SHARED_DATA)")
    import pandas as pd
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    df = pd.read_csv(path, comment="#")
    row = df[df["material_id"] == "mp-14983"].iloc[0]  # RuP4Si4, P-1
    s = Structure.from_dict(ast.literal_eval(row["structure"]))
    assert SpacegroupAnalyzer(s).get_crystal_system() == "triclinic"
    return s


def _crystals() -> dict[str, Structure]:
    """Named real crystals built with pymatgen/ASE (ideal positions)."""
    ada = AseAtomsAdaptor()
    out = {
        "NaCl-primitive": ada.get_structure(bulk("NaCl", "rocksalt", a=5.64)),
        "NaCl-conventional": Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        "ZnO-wurtzite": ada.get_structure(bulk("ZnO", "wurtzite", a=3.25, c=5.207, u=0.382)),
        "GaN-wurtzite": Structure.from_spacegroup(
            "P6_3mc", Lattice.hexagonal(3.189, 5.185), ["Ga", "N"], [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.377]]
        ),
        "SrTiO3-perovskite": Structure(
            Lattice.cubic(3.905), ["Sr", "Ti", "O", "O", "O"], [[0, 0, 0], [0.5] * 3, [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
        ),
    }
    # strongly skewed cell: Si primitive cell times a unimodular integer matrix (same crystal)
    si = bulk("Si", "diamond", a=5.431)
    m = np.array([[1, 0, 0], [3, 1, 0], [-2, 4, 1]])
    skew = Atoms("Si2", positions=si.positions, cell=m @ np.array(si.cell), pbc=True)
    out["Si-skewed"] = ada.get_structure(skew)
    return out


def _shortest(atoms: Atoms) -> float:
    return float(np.linalg.norm(np.array(atoms.cell), axis=1)[atoms.pbc].min())


# ----------------------------------------------------------------------------- tests: molecules


def test_qm9_molecules_match_ase():
    for mol in _qm9_molecules():
        for cutoff in (1.6, 5.0):
            ref = _check_all(mol, cutoff, what=mol.get_chemical_formula())
            ei = radius_graph(torch.tensor(mol.positions), cutoff)
            assert {(i, j) for i, j, _ in ref} == set(zip(ei[1].tolist(), ei[0].tolist()))


def test_radius_graph_batch_does_not_cross_graphs():
    mols = _qm9_molecules(4)
    pos = torch.tensor(np.concatenate([m.positions for m in mols]))
    batch = torch.cat([torch.full((len(m),), k) for k, m in enumerate(mols)])
    ei = radius_graph(pos, 30.0, batch)  # larger than any molecule: complete graphs
    assert bool((batch[ei[0]] == batch[ei[1]]).all())
    assert ei.shape[1] == sum(len(m) * (len(m) - 1) for m in mols)
    # an unsorted batch vector (atoms of the graphs interleaved) gives the same graph
    perm = torch.randperm(len(pos), generator=torch.Generator().manual_seed(0))
    for method in METHODS:
        ei_p = radius_graph(pos[perm], 3.0, batch[perm], method=method)
        ref = radius_graph(pos, 3.0, batch)
        got = perm[ei_p]  # back to the original atom numbering (new atom k is old perm[k])
        assert sorted(zip(got[1].tolist(), got[0].tolist())) == list(zip(ref[1].tolist(), ref[0].tolist()))


# ----------------------------------------------------------------------------- tests: crystals


@pytest.mark.parametrize("name", list(_crystals()))
def test_crystals_match_ase_and_pymatgen(name):
    s = _crystals()[name]
    atoms = AseAtomsAdaptor.get_atoms(s)
    for cutoff in (3.07, 6.13, 3 * _shortest(atoms) + 0.011):  # the last: many images per direction
        _check_all(atoms, cutoff, s, what=name)


def test_triclinic_mp_crystal_match_ase_and_pymatgen():
    s = _triclinic_mp()
    atoms = AseAtomsAdaptor.get_atoms(s)
    for cutoff in (4.1, 3 * _shortest(atoms) + 0.013):
        _check_all(atoms, cutoff, s, what="mp-14983")


def test_cutoff_larger_than_cell_counts_images():
    """A one-atom cubic cell with cutoff 3.5 a: every lattice point within the sphere is an edge."""
    a = 2.0
    atoms = Atoms("Po", positions=[[0.3, 0.2, 0.1]], cell=np.eye(3) * a, pbc=True)
    ours = _ours(atoms, 3.5 * a)
    grid = np.stack(np.meshgrid(*[np.arange(-4, 5)] * 3, indexing="ij"), -1).reshape(-1, 3)
    r = np.linalg.norm(grid * a, axis=1)
    expected = {(0, 0, tuple(int(v) for v in g)) for g, x in zip(grid, r) if 0 < x < 3.5 * a}
    assert set(ours) == expected


def test_slab_with_vacuum_periodic_in_xy_only():
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=7.5)
    assert slab.pbc.tolist() == [True, True, False]
    s = AseAtomsAdaptor.get_structure(slab)
    for cutoff in (3.0, 3 * _shortest(slab) + 0.017):
        ref = _check_all(slab, cutoff, s, what="Cu(111) slab")
        assert all(k[2][2] == 0 for k in ref)  # no images along z
    # the non-periodic lattice vector is irrelevant: zero it (as stored for slabs without c)
    pos, cell, pbc = _tensors(slab)
    cell0 = cell.clone()
    cell0[2] = 0
    for method in METHODS:
        a = radius_graph_pbc(pos, cell, pbc, 5.0, method=method)
        b = radius_graph_pbc(pos, cell0, pbc, 5.0, method=method)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_wire_periodic_in_one_direction():
    wire = Atoms("C4", positions=[[0, 0, 0], [1.4, 0.1, 0.7], [0.1, 1.3, 1.5], [0.9, 1.0, 2.2]], cell=[20.0, 20.0, 2.9], pbc=[False, False, True])
    _check_all(wire, 7.3, what="1D wire")


def test_atoms_outside_the_cell():
    s = _crystals()["NaCl-conventional"]
    atoms = AseAtomsAdaptor.get_atoms(s)
    rng = np.random.default_rng(0)
    cell = np.array(atoms.cell)
    atoms.positions = atoms.positions + rng.integers(-3, 4, size=(len(atoms), 3)) @ cell + np.array([-7.1, 13.2, 2.5])
    frac = atoms.get_scaled_positions(wrap=False)
    assert (frac < 0).any() and (frac >= 1).any()
    s_out = Structure(s.lattice, s.species, atoms.positions, coords_are_cartesian=True, to_unit_cell=False)
    for cutoff in (3.07, 3 * _shortest(atoms) + 0.011):
        _check_all(atoms, cutoff, s_out, what="NaCl, atoms outside")
    # the skewed Si cell also holds its atoms outside the cell
    skew = AseAtomsAdaptor.get_atoms(_crystals()["Si-skewed"])
    skew.positions += np.array([[30.0, -20.0, 11.0], [-45.0, 3.0, 0.0]])
    _check_all(skew, 5.5, what="skewed Si, atoms outside")


def test_float32_matches_float64():
    atoms = AseAtomsAdaptor.get_atoms(_triclinic_mp())
    cutoff = 6.2
    ref = _ours(atoms, cutoff, dtype=torch.float64)
    for method in METHODS:
        got = _ours(atoms, cutoff, method, dtype=torch.float32)
        assert set(got) == set(ref)
        assert max(abs(got[k] - ref[k]) for k in ref) < 1e-4
    pos32, cell32, pbc = _tensors(atoms, torch.float32)
    _, _, dist = neighbor_search(pos32, cell32, pbc, cutoff)
    assert dist.dtype == torch.float32


def test_float32_far_from_origin_is_symmetric():
    """float32 at |x| ~ 1000 Å: both directions of every pair, same edges as float64 away from the cutoff."""
    atoms = _random_periodic(3000, 0.05, seed=5)
    atoms.positions += 1000.0
    cutoff = 4.7
    pos32, cell32, pbc = _tensors(atoms, torch.float32)
    ei, shift, dist = neighbor_search(pos32, cell32, pbc, cutoff)
    fwd = set(zip(ei[1].tolist(), ei[0].tolist(), map(tuple, shift.tolist())))
    assert {(j, i, tuple(-v for v in s)) for i, j, s in fwd} == fwd
    ref = _ours(atoms, cutoff)  # float64
    ref_d = np.array([ref[k] for k in set(ref) ^ fwd if k in ref])
    assert len(ref_d) < 10 and np.all(np.abs(ref_d - cutoff) < 1e-3)
    assert all(abs(_ours(atoms, cutoff + 1e-3)[k] - cutoff) < 1e-3 for k in fwd - set(ref))


def test_reduce_cell_keeps_the_lattice():
    from equiformer.graph.pbc import perpendicular_heights, reduce_cell

    skew = AseAtomsAdaptor.get_atoms(_crystals()["Si-skewed"])
    cell = torch.tensor(np.array(skew.cell)).unsqueeze(0)
    pbc = torch.ones(1, 3, dtype=torch.bool)
    red, m = reduce_cell(cell, pbc)
    assert torch.allclose(m.double() @ cell, red)
    assert abs(float(torch.linalg.det(m.double()))) == 1.0
    assert float(perpendicular_heights(red).min()) > 2.5 > float(perpendicular_heights(cell).min())
    slab = torch.tensor([[[3.0, 0, 0], [7.4, 2.6, 0], [0, 0, 0]]])  # pbc (T, T, F), zero c vector
    red, m = reduce_cell(slab, torch.tensor([[True, True, False]]))
    assert torch.equal(m[0, 2], torch.tensor([0, 0, 1])) and float(red[0, 1].norm()) < 3.2


# ----------------------------------------------------------------------------- batches and build_edges


def _data(atoms: Atoms) -> Data:
    return Data(
        pos=torch.tensor(atoms.positions),
        z=torch.tensor(atoms.numbers),
        cell=torch.tensor(np.array(atoms.cell)).unsqueeze(0),
        pbc=torch.tensor(atoms.pbc).unsqueeze(0),
    )


def _mixed_systems() -> list[Atoms]:
    mols = _qm9_molecules(3)
    cr = _crystals()
    outside = AseAtomsAdaptor.get_atoms(cr["Si-skewed"])
    outside.positions += np.array([[30.0, -20.0, 11.0], [-45.0, 3.0, 0.0]])
    return [
        mols[0],
        AseAtomsAdaptor.get_atoms(cr["NaCl-primitive"]),
        fcc111("Cu", size=(2, 2, 3), vacuum=7.5),
        mols[2],
        AseAtomsAdaptor.get_atoms(_triclinic_mp()),
        outside,
        AseAtomsAdaptor.get_atoms(cr["SrTiO3-perovskite"]),
    ]


def test_batch_mixing_molecules_and_crystals():
    systems = _mixed_systems()
    for m in systems:
        m.cell = m.cell if m.pbc.any() else np.zeros((3, 3))
    batch = Batch.from_data_list([_data(a) for a in systems])
    assert batch.cell.shape == (len(systems), 3, 3) and batch.pbc.shape == (len(systems), 3)
    cutoff = 5.1
    offsets = np.cumsum([0] + [len(a) for a in systems])
    expected = {}
    for k, atoms in enumerate(systems):
        for (i, j, s), d in _ase(atoms, cutoff).items():
            expected[(i + offsets[k], j + offsets[k], s)] = d
    results = {}
    for method in METHODS:
        ei, shift = radius_graph_pbc(batch.pos, batch.cell, batch.pbc, cutoff, batch.batch, method=method)
        results[method] = (ei, shift)
        _, vec = build_edges(batch, cutoff, method=method)
        got = {(i, j, tuple(s)): d for i, j, s, d in zip(ei[1].tolist(), ei[0].tolist(), shift.tolist(), vec.norm(dim=1).tolist())}
        _assert_same(got, expected, f"mixed batch, {method}")
    # deterministic: every method returns the same tensors, sorted by (i, j, shift)
    for method in METHODS[1:]:
        assert torch.equal(results[method][0], results["brute"][0]) and torch.equal(results[method][1], results["brute"][1])
    ei, shift = results["auto"]
    keys = [(i, j, tuple(s)) for i, j, s in zip(ei[1].tolist(), ei[0].tolist(), shift.tolist())]
    assert keys == sorted(keys)


def test_build_edges_single_data_and_reference():
    atoms = AseAtomsAdaptor.get_atoms(_crystals()["GaN-wurtzite"])
    data = _data(atoms)  # no batch vector
    ei, vec, shift = build_edges(data, 4.4, return_shift=True)
    ref_ei, ref_shift, ref_d = radius_graph_pbc_reference(data.pos, data.cell, data.pbc, 4.4)
    assert torch.equal(ei, ref_ei) and torch.equal(shift, ref_shift)
    assert torch.allclose(vec.norm(dim=1), ref_d, atol=1e-12)


def test_build_edges_forces_are_gradients():
    """forces = -dE/dpos through edge_vec (and dE/dcell) match central finite differences."""
    systems = _mixed_systems()[:3]
    for m in systems:
        m.rattle(0.02, seed=3)
    batch = Batch.from_data_list([_data(a) for a in systems])
    cutoff = 4.0

    def energy(pos, cell):
        b = batch.clone()
        b.pos, b.cell = pos, cell
        _, vec = build_edges(b, cutoff)
        r = vec.norm(dim=1)
        return (torch.cos(torch.pi * r / cutoff) + 1).pow(2).sum() * 0.5  # smooth at the cutoff

    pos = batch.pos.clone().requires_grad_(True)
    cell = batch.cell.clone().requires_grad_(True)
    e = energy(pos, cell)
    gpos, gcell = torch.autograd.grad(e, (pos, cell))
    h = 1e-6
    for a, k in [(0, 0), (5, 1), (len(systems[0]) + 1, 2), (len(pos) - 1, 0)]:
        p1, p2 = pos.detach().clone(), pos.detach().clone()
        p1[a, k] += h
        p2[a, k] -= h
        num = (energy(p1, cell.detach()) - energy(p2, cell.detach())) / (2 * h)
        assert abs(float(num) - float(gpos[a, k])) < 1e-6 * max(1.0, abs(float(num)))
    c1, c2 = cell.detach().clone(), cell.detach().clone()
    c1[1, 0, 1] += h
    c2[1, 0, 1] -= h
    num = (energy(pos.detach(), c1) - energy(pos.detach(), c2)) / (2 * h)
    assert abs(float(num) - float(gcell[1, 0, 1])) < 1e-6 * max(1.0, abs(float(num)))
    assert float(gcell[1].abs().sum()) > 0 and float(gcell[0].abs().sum()) == 0  # molecule: no cell dependence


def test_rotation_and_translation_invariance():
    atoms = AseAtomsAdaptor.get_atoms(_triclinic_mp())
    pos, cell, pbc = _tensors(atoms)
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    a = radius_graph_pbc(pos, cell, pbc, 5.5)
    b = radius_graph_pbc(pos @ q.T + torch.tensor([3.0, -8.0, 1.5], dtype=torch.float64), cell @ q.T, pbc, 5.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_max_num_neighbors_keeps_nearest():
    mol = _qm9_molecules(3)[2]
    pos = torch.tensor(mol.positions)
    full, _, dist = neighbor_search(pos, None, None, 4.0)
    k = 5
    ei = radius_graph(pos, 4.0, max_num_neighbors=k)
    deg_full = torch.bincount(full[1], minlength=len(mol))
    assert torch.equal(torch.bincount(ei[1], minlength=len(mol)), deg_full.clamp(max=k))
    for i in range(len(mol)):
        kept = torch.linalg.norm(pos[ei[0][ei[1] == i]] - pos[i], dim=1)
        all_d = dist[full[1] == i].sort().values
        assert torch.allclose(kept.sort().values, all_d[:k])


# ----------------------------------------------------------------------------- large systems


def _random_periodic(n: int, density: float, seed: int) -> Atoms:
    rng = np.random.default_rng(seed)
    shape = np.array([[1.0, 0.0, 0.0], [0.31, 0.93, 0.0], [-0.22, 0.27, 0.91]])  # triclinic
    scale = (n / density / abs(np.linalg.det(shape))) ** (1 / 3)
    cell = shape * scale
    frac = rng.random((n, 3))
    frac[: n // 50] += rng.integers(-2, 3, size=(n // 50, 3))  # some atoms outside the cell
    return Atoms(f"Ar{n}", positions=frac @ cell, cell=cell, pbc=True)


def test_large_random_system_cell_list_matches_ase():
    torch.manual_seed(0)
    atoms = _random_periodic(20_000, 0.05, seed=0)
    cutoff = 4.5
    ref_i, ref_j, ref_d, ref_S = neighbor_list("ijdS", atoms, cutoff)
    pos, cell, pbc = _tensors(atoms)
    ei, shift, dist = neighbor_search(pos, cell, pbc, cutoff, method="cell_list")
    # compare as sorted tables (sets of 400k tuples are slow to build)
    ours = np.concatenate([ei[1].numpy()[:, None], ei[0].numpy()[:, None], shift.numpy()], axis=1)
    ref = np.concatenate([ref_i[:, None], ref_j[:, None], ref_S], axis=1)
    o_ord = np.lexsort(ours.T[::-1])
    r_ord = np.lexsort(ref.T[::-1])
    assert len(ref) > 300_000
    assert np.array_equal(ours[o_ord], ref[r_ord])
    assert np.abs(dist.numpy()[o_ord] - ref_d[r_ord]).max() < 1e-6
    assert np.array_equal(o_ord, np.arange(len(o_ord)))  # already sorted by (i, j, shift)
    # both directions: (i, j, S) <-> (j, i, -S)
    rev = np.concatenate([ours[:, 1:2], ours[:, 0:1], -ours[:, 2:]], axis=1)
    assert np.array_equal(rev[np.lexsort(rev.T[::-1])], ours)


def test_large_cluster_cell_list_matches_kdtree():
    """6k atoms, not periodic, uneven density: cell lists vs scipy's k-d tree (ASE is slow here)."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(1)
    pos = rng.normal(size=(6000, 3)) * 12.0
    cutoff = 3.3
    pairs = cKDTree(pos).query_pairs(cutoff, output_type="ndarray")
    d = np.linalg.norm(pos[pairs[:, 0]] - pos[pairs[:, 1]], axis=1)
    assert not np.any(np.abs(d - cutoff) < 1e-9)
    ref = np.concatenate([pairs, pairs[:, ::-1]])
    ref = ref[np.lexsort(ref.T[::-1])]
    for method in ("cell_list", "auto"):
        ei = radius_graph(torch.tensor(pos), cutoff, method=method)
        got = torch.stack([ei[1], ei[0]], dim=1).numpy()
        assert len(ref) > 50_000 and np.array_equal(got, ref)  # also: sorted by (i, j)


def test_memory_is_bounded_by_chunks(monkeypatch):
    """Tiny chunks (many blocks of centres and of candidates) give the same answer as one chunk."""
    import equiformer.graph.radius as radius

    atoms = AseAtomsAdaptor.get_atoms(_crystals()["ZnO-wurtzite"])
    pos, cell, pbc = _tensors(atoms)
    a = radius_graph_pbc(pos, cell, pbc, 9.0, method="cell_list")
    monkeypatch.setattr(radius, "CHUNK_CANDIDATES", 97)
    monkeypatch.setattr(radius, "CHUNK_ENTRIES", 60)  # several blocks of centres too
    b = radius_graph_pbc(pos, cell, pbc, 9.0, method="cell_list")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- errors and edge cases


def test_bad_input_errors():
    pos = torch.zeros(3, 3, dtype=torch.float64)
    pos[1, 0], pos[2, 1] = 1.0, 1.0
    with pytest.raises(ValueError, match="cutoff"):
        radius_graph(pos, -1.0)
    with pytest.raises(ValueError, match="pos must"):
        radius_graph(pos[:, :2], 2.0)
    with pytest.raises(ValueError, match="linearly dependent"):
        radius_graph_pbc(pos, torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1.0]]), torch.tensor([True, True, False]), 2.0)
    with pytest.raises(ValueError, match="cell"):
        radius_graph_pbc(pos, torch.eye(3).repeat(2, 1, 1), torch.ones(2, 3, dtype=torch.bool), 2.0, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="non-finite"):
        radius_graph(pos * float("nan"), 2.0)
    ei = radius_graph(torch.zeros(0, 3), 2.0)
    assert ei.shape == (2, 0)
    ei, shift = radius_graph_pbc(pos[:1], torch.eye(3) * 10, torch.ones(3, dtype=torch.bool), 2.0)
    assert ei.shape == (2, 0) and shift.shape == (0, 3)


def test_bench_command_writes_json(tmp_path):
    from equiformer.cli import main

    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    rc = main(["bench", "neighbors", "--device", "cpu", "--sizes", "60", "--repeats", "1", "--out", str(out), "--markdown", str(md)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["system"] for r in rows} >= {"Cu-fcc", "Si-diamond", "cluster"}
    assert all(r["edges"] > 0 and r["ours_s"] > 0 for r in rows)
    assert all(r["edges_match_ase"] for r in rows if r.get("ase_s") is not None)
    assert "| system |" in md.read_text()
