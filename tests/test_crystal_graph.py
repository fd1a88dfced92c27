"""ComFormer's lattice-based crystal graph (equiformer.graph.crystal) on real crystals.

k-NN sets against pymatgen's neighbour lists, batching, float32, the primitive translation
search against pymatgen's primitive cells, the lattice vectors against independently computed
successive minima, invariance of the graph's geometric features under every description of
the same crystal (supercells, Niggli/LLL/skewed cells, wrapping, rotation), and chirality.
"""

from __future__ import annotations

import ast
import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

pytest.importorskip("pymatgen")
from pymatgen.core import Lattice, Structure  # noqa: E402

from equiformer.data import from_pymatgen  # noqa: E402
from equiformer.graph.crystal import (  # noqa: E402
    LatticeCache,
    build_crystal_graph,
    knn_graph_pbc,
    lattice_frame_candidates,
    primitive_translations,
)
from equiformer.testing import random_rotation  # noqa: E402

DATA = Path(os.environ.get("EQUIFORMER_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
FLLA = DATA / "materials_project" / "flla_2015.csv"
needs_mp = pytest.mark.skipif(not FLLA.is_file(), reason=f"shared MP data not found in {DATA}")


# ----------------------------------------------------------------------------- structures


def nacl(primitive: bool = True) -> Structure:
    s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return s.get_primitive_structure() if primitive else s


def perovskite() -> Structure:
    return Structure.from_spacegroup("Pm-3m", Lattice.cubic(3.905), ["Sr", "Ti", "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]])


def quartz(handed: str = "P3_121") -> Structure:
    """alpha-quartz SiO2 (Si 3a, O 6c); P3_221 with negated coordinates is its mirror image."""
    sign = 1 if handed == "P3_121" else -1
    coords = [[0.4697 * sign, 0, sign / 3], [0.4135 * sign, 0.2669 * sign, 0.1191 * sign]]
    return Structure.from_spacegroup(handed, Lattice.hexagonal(4.913, 5.405), ["Si", "O"], coords)


def wurtzite() -> Structure:
    """ZnO, P6_3mc: polar but achiral (it has mirror planes)."""
    return Structure.from_spacegroup("P6_3mc", Lattice.hexagonal(3.25, 5.207), ["Zn", "O"], [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.382]])


def mp_structures(ids: list[str]) -> dict[str, Structure]:
    import pandas as pd

    df = pd.read_csv(FLLA, comment="#")
    rows = df[df.material_id.isin(ids)]
    return {r.material_id: Structure.from_dict(ast.literal_eval(r.structure)) for r in rows.itertuples()}


#: MP structures: P312 with a = b to 1e-7 (mp-10341), near-tetragonal I4_1/a (mp-19330), frames
#: that only degree-4 moments tell apart (mp-10010 P-3m1) and degree-6 ones (mp-1746 pyrite-type
#: Pa-3, mp-1317 Im-3), a 22-atom cell (mp-17334), mp-18802, mp-10000
MP_IDS = ["mp-10341", "mp-19330", "mp-10010", "mp-1746", "mp-1317", "mp-17334", "mp-18802", "mp-10000"]


def as_data(s: Structure, dtype: torch.dtype = torch.float64):
    d = from_pymatgen(s)
    d.pos, d.cell = d.pos.to(dtype), d.cell.to(dtype)
    return d


def edge_features(d, k: int = 12) -> tuple[np.ndarray, np.ndarray, float]:
    """What ComFormer sees: rows (z_i, z_j, |e|, cos(e, l1), cos(e, l2), cos(e, l3)) of the crystal
    graph's edges, the lattice Gram matrix and the number of edges per atom."""
    g = build_crystal_graph(d, k=k)
    vec = g.edge_vec.detach().double()
    r = vec.norm(dim=1)
    lat = g.lattice[0].detach().double()
    cos = (vec / r[:, None]) @ (lat / lat.norm(dim=1, keepdim=True)).T
    z = d.z[g.edge_index]
    rows = torch.cat([z[1, :, None].double(), z[0, :, None].double(), r[:, None], cos], dim=1).numpy()
    return rows, (lat @ lat.T).numpy(), g.num_edges / d.pos.shape[0]


_PROBE = np.random.default_rng(0).normal(size=(256, 6)) * np.array([0.3, 0.3, 2.0, 3.0, 3.0, 3.0])


def assert_same_features(a, b, atol: float = 1e-5) -> None:
    """Equal edge-row multisets (as distributions: a supercell has n_cells times the rows), compared
    through the means of 256 random Fourier features, plus equal lattice metrics and degrees."""
    (ra, ga, na), (rb, gb, nb) = a, b
    assert na == pytest.approx(nb), f"{na} vs {nb} edges per atom"
    fa, fb = np.cos(ra @ _PROBE.T).mean(axis=0), np.cos(rb @ _PROBE.T).mean(axis=0)
    err = np.abs(fa - fb).max()
    assert err < atol, f"edge feature distributions differ (max Fourier-feature difference {err:.2e})"
    # near-symmetric MP cells (lengths equal to ~1e-9) may take a nearly equivalent frame;
    # pymatgen also moves atoms by ~1e-7 Å when it transforms a cell
    np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-5 + 1e-6 * np.abs(ga).max())


# ----------------------------------------------------------------------------- k nearest neighbours


def pymatgen_knn(s: Structure, k: int, tol: float = 1e-4) -> list[set[tuple[int, tuple[int, ...]]]]:
    """For each site, the (index, image) of every neighbour within the k-th distance + tol (pymatgen)."""
    r = 4.0
    while True:
        nbrs = s.get_all_neighbors(r)
        if min(len(x) for x in nbrs) > k and all(sorted(x.nn_distance for x in n)[k - 1] + 2 * tol < r for n in nbrs):
            break
        r *= 1.5
    out = []
    for n in nbrs:
        dk = sorted(x.nn_distance for x in n)[k - 1]
        out.append({(x.index, tuple(int(v) for v in x.image)) for x in n if x.nn_distance <= dk + tol})
    return out


def ours_knn(d, k: int) -> list[set[tuple[int, tuple[int, ...]]]]:
    ei, sh = knn_graph_pbc(d.pos, d.cell, d.pbc, k, symmetric=False)
    out: list[set] = [set() for _ in range(d.pos.shape[0])]
    for j, i, s in zip(ei[0].tolist(), ei[1].tolist(), sh.tolist()):
        out[i].add((j, tuple(s)))
    return out


@pytest.mark.parametrize("name", ["nacl_conventional", "perovskite", "quartz", "mp"])
def test_knn_equals_pymatgen(name):
    structures = {"nacl_conventional": [nacl(False)], "perovskite": [perovskite()], "quartz": [quartz()]}
    if name == "mp":
        if not FLLA.is_file():
            pytest.skip("shared MP data missing")
        structures["mp"] = list(mp_structures(MP_IDS[:3]).values())
    for s in structures[name]:
        for k in (6, 25):
            ref = pymatgen_knn(s, k)
            ours = ours_knn(as_data(s), k)
            for i, (a, b) in enumerate(zip(ref, ours)):
                assert a == b, f"{s.formula} site {i}, k={k}: pymatgen-only {sorted(a - b)[:3]}, ours-only {sorted(b - a)[:3]}"
            assert all(len(x) >= k for x in ours)


def test_knn_ties_are_kept_and_graph_is_symmetric():
    d = as_data(nacl(True))
    ei, sh, dist = knn_graph_pbc(d.pos, d.cell, d.pbc, 7, symmetric=False, return_distance=True)
    # rock salt: 6 Cl at 2.82 Å, then 12 Na at 3.99 Å: k = 7 keeps the whole second shell (6 + 12)
    counts = torch.bincount(ei[1])
    assert counts.tolist() == [18, 18]
    ei2, sh2 = knn_graph_pbc(d.pos, d.cell, d.pbc, 7)
    fwd = {(j, i, tuple(s)) for j, i, s in zip(ei2[0].tolist(), ei2[1].tolist(), sh2.tolist())}
    assert all((i, j, tuple(-v for v in s)) in fwd for j, i, s in fwd)
    # sorted by (centre, neighbour, shift), no duplicates
    assert len(fwd) == ei2.shape[1]
    assert bool((ei2[1][1:] >= ei2[1][:-1]).all())


def test_knn_batched_float32_and_wrapped_match_single():
    structures = [nacl(False), quartz(), perovskite()]
    # a sparse crystal in the same batch: its search radius is larger (another radius bucket)
    sparse = Structure(Lattice.cubic(9.0), ["Cs"], [[0, 0, 0]])
    datas = [as_data(s) for s in structures + [sparse]]
    batch = Batch.from_data_list(datas)
    ei, sh = knn_graph_pbc(batch.pos, batch.cell, batch.pbc, 16, batch.batch)
    offset = 0
    for d in datas:
        e1, s1 = knn_graph_pbc(d.pos, d.cell, d.pbc, 16)
        n = d.pos.shape[0]
        sel = (ei[1] >= offset) & (ei[1] < offset + n)
        assert torch.equal(ei[:, sel] - offset, e1) and torch.equal(sh[sel], s1)
        offset += n
    # float32 input, atoms wrapped across cell faces: same neighbours (shifts absorb the wrapping)
    d = as_data(quartz(), torch.float32)
    e64, s64 = knn_graph_pbc(d.pos.double(), d.cell.double(), d.pbc, 20)
    e32, s32 = knn_graph_pbc(d.pos, d.cell, d.pbc, 20)
    assert torch.equal(e64, e32) and torch.equal(s64, s32)
    moved = d.pos + torch.tensor([[1.0, -1.0, 2.0]]) @ d.cell[0] * (torch.arange(9) % 2 == 0)[:, None]
    ew, sw = knn_graph_pbc(moved, d.cell, d.pbc, 20)
    vec = lambda p, e, s: p[e[0]] + s.to(p.dtype) @ d.cell[0] - p[e[1]]  # noqa: E731
    assert torch.equal(ew, e32)
    torch.testing.assert_close(vec(moved, ew, sw), vec(d.pos, e32, s32), atol=1e-4, rtol=0)


def test_knn_molecule_and_errors():
    pos = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [0, 1.2, 0], [0, 0, 1.5]])
    ei, sh = knn_graph_pbc(pos, None, None, 10)  # fewer atoms than k: all pairs
    assert ei.shape[1] == 12 and not sh.any()
    with pytest.raises(ValueError, match="positive"):
        knn_graph_pbc(pos, None, None, 0)
    mol = copy.copy(as_data(nacl()))
    mol.pbc = torch.zeros(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="periodic in all three directions"):
        build_crystal_graph(mol)


# ----------------------------------------------------------------------------- translations, lattice vectors


def test_primitive_translations_match_pymatgen():
    cases = [(nacl(False), 4), (nacl(True), 1), (perovskite(), 1)]
    sc = quartz()
    sc.make_supercell([[1, 1, 0], [0, 2, 0], [0, 0, 2]])
    cases.append((sc, 4))
    for s, expected in cases:
        frac = s.frac_coords
        t, perm = primitive_translations(frac, np.array(s.atomic_numbers), s.lattice.matrix)
        assert len(t) == expected == round(len(s) / len(s.get_primitive_structure())), s.formula
        for a in range(len(t)):  # each translation maps every atom onto an atom of the same element
            d = frac + t[a] - frac[perm[a]]
            assert np.abs(d - np.round(d)).max() < 1e-6
            assert (np.array(s.atomic_numbers)[perm[a]] == np.array(s.atomic_numbers)).all()


def successive_minima(lattice: np.ndarray) -> np.ndarray:
    """lambda_1..3 of a lattice by brute-force enumeration on pymatgen's LLL-reduced basis."""
    red = Lattice(lattice).get_lll_reduced_lattice().matrix
    rng = np.arange(-3, 4)
    n = np.stack(np.meshgrid(rng, rng, rng, indexing="ij"), -1).reshape(-1, 3)
    v = n @ red
    v = v[np.linalg.norm(v, axis=1) > 1e-9]
    v = v[np.argsort(np.linalg.norm(v, axis=1))]
    basis = [v[0]]
    for x in v[1:]:
        if np.linalg.matrix_rank(np.stack(basis + [x]), tol=1e-6) == len(basis) + 1:
            basis.append(x)
        if len(basis) == 3:
            break
    return np.linalg.norm(np.stack(basis), axis=1)


def test_lattice_vectors_follow_comformer_rule():
    structures = [nacl(False), nacl(True), perovskite(), quartz(), wurtzite()]
    if FLLA.is_file():
        structures += list(mp_structures(MP_IDS).values())
    for s in structures:
        g = build_crystal_graph(as_data(s), k=12)
        lat = g.lattice[0].numpy()
        lengths = np.linalg.norm(lat, axis=1)
        # shortest vectors of the primitive lattice (pymatgen's primitive cell, independent code)
        np.testing.assert_allclose(lengths, successive_minima(s.get_primitive_structure().lattice.matrix), rtol=1e-3)
        unit = lat / lengths[:, None]
        assert unit[0] @ unit[1] >= -1e-4 and unit[0] @ unit[2] >= -1e-4  # at most 90 degrees (+ tolerance) from l1
        assert np.linalg.det(lat) > 0  # right-handed
        # the lattice self-edges i -> i +- l_k exist and join atoms of the same element
        vec = g.edge_vec.numpy()
        z = as_data(s).z.numpy()
        for i in range(len(s)):
            mine = vec[g.edge_index[1].numpy() == i]
            for v in np.concatenate([lat, -lat]):
                hit = np.flatnonzero(np.abs(mine - v).max(axis=1) < 1e-8)
                assert len(hit) == 1
                j = g.edge_index[0].numpy()[g.edge_index[1].numpy() == i][hit[0]]
                assert z[j] == z[i]


def test_frame_candidates_of_symmetric_lattices():
    # cubic P: 24 proper rotations of the cube; hexagonal: 12 of 622; orthorhombic: 4 of 222
    assert len(lattice_frame_candidates(np.eye(3) * 4.0)) == 24
    assert len(lattice_frame_candidates(Lattice.hexagonal(3.0, 5.0).matrix)) == 12
    assert len(lattice_frame_candidates(np.diag([3.0, 4.0, 5.0]))) == 4
    tric = Lattice.from_parameters(3.1, 4.2, 5.3, 81, 97, 103).matrix
    (frame,) = lattice_frame_candidates(tric) @ tric
    assert np.linalg.det(frame) > 0


# ----------------------------------------------------------------------------- invariance, chirality


def descriptions(s: Structure) -> dict[str, Structure]:
    """The same crystal written down differently."""
    out = {"niggli": s.get_reduced_structure("niggli"), "lll": s.get_reduced_structure("LLL")}
    out["supercell"] = s.make_supercell([2, 1, 1], in_place=False)
    out["skew_supercell"] = s.make_supercell([[1, 1, 0], [0, 1, 0], [1, 0, 2]], in_place=False)
    u = np.array([[1, 1, 0], [0, 1, -1], [1, 1, 1]])
    out["skewed"] = Structure(Lattice(u @ s.lattice.matrix), s.species, s.cart_coords, coords_are_cartesian=True, to_unit_cell=True)
    return out


@pytest.mark.parametrize("which", ["nacl", "quartz", "wurtzite", "mp"])
def test_graph_features_do_not_depend_on_the_unit_cell(which):
    if which == "mp":
        if not FLLA.is_file():
            pytest.skip("shared MP data missing")
        structures = list(mp_structures(MP_IDS[:5]).values())
    else:
        structures = [{"nacl": nacl(False), "quartz": quartz(), "wurtzite": wurtzite()}[which]]
    for s in structures:
        ref = edge_features(as_data(s))
        for name, other in descriptions(s).items():
            try:
                assert_same_features(ref, edge_features(as_data(other)))
            except AssertionError as e:
                raise AssertionError(f"{s.formula}, {name} description: {e}") from None
        rotated = as_data(s)
        R = random_rotation(generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        rotated.pos, rotated.cell = rotated.pos @ R.T + 1.7, rotated.cell @ R.T
        assert_same_features(ref, edge_features(rotated))


def mirrored(d):
    e = copy.copy(d)
    e.pos, e.cell = -d.pos, -d.cell  # inversion = a mirror up to a proper rotation
    return e


def test_lattice_frame_tells_a_chiral_crystal_from_its_mirror_image():
    right = as_data(quartz("P3_121"))
    left_built = as_data(quartz("P3_221"))  # built independently from the other space group
    ref = edge_features(right)
    mirror = edge_features(mirrored(right))
    assert_same_features(mirror, edge_features(left_built))  # the enantiomorph is P3_221
    with pytest.raises(AssertionError):
        assert_same_features(ref, mirror)
    # the distance-only part (z_i, z_j, |e|) cannot tell them apart
    rows = lambda f: f[0][np.lexsort(f[0][:, :3].T[::-1]), :3]  # noqa: E731
    np.testing.assert_allclose(rows(ref), rows(mirror), atol=1e-9)
    # an achiral polar crystal (mirror planes) is its own mirror image up to rotation
    w = as_data(wurtzite())
    assert_same_features(edge_features(w), edge_features(mirrored(w)))


def test_lattice_cache_reuses_frames():
    cache = LatticeCache(8)
    d = Batch.from_data_list([as_data(quartz()), as_data(perovskite())])
    g1 = build_crystal_graph(d, k=12, cache=cache)
    assert cache.misses == 2 and cache.hits == 0 and len(cache) == 2
    g2 = build_crystal_graph(d, k=12, cache=cache)
    assert cache.hits == 2
    assert torch.equal(g1.edge_index, g2.edge_index) and torch.equal(g1.lattice, g2.lattice)
    build_crystal_graph(d, k=13, cache=cache)  # other graph options: other keys
    assert cache.misses == 4
    assert len(copy.deepcopy(cache)) == 0
