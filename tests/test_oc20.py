"""OC20 adapters: relaxation trajectories (checked against ASE), OCP LMDBs written here in the
fairchem format (read back identically, also from DataLoader workers), ASE databases, the
restricted unpickler, the S2EF extxyz -> LMDB conversion, and clear errors for bad files."""

from __future__ import annotations

import io
import lzma
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader

from equiformer.data import StructureError

SHARED = Path(os.environ.get("EQUIFORMER_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
TARBALL = SHARED / "oc20" / "oc20_relaxation_trajectories.tar.gz"
BULKS = SHARED / "oc20" / "bulks.db"
#: the two shortest real relaxations (36 and 27 frames; 49 and 97 atoms)
SMALL_TRAJS = ["random1000156", "random1000163"]

lmdb = pytest.importorskip("lmdb")


pytestmark = pytest.mark.usefixtures("one_thread")


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found: {path} (set EQUIFORMER_SHARED_DATA)")
    return path


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("oc20_cache")


@pytest.fixture(scope="module")
def ase_frames(tmp_path_factory) -> dict[str, list]:
    """ASE's own reading of the small trajectories, straight from the shared archive."""
    from ase.io import read

    out = tmp_path_factory.mktemp("ase_traj")
    frames = {}
    with tarfile.open(_need(TARBALL)) as tar:
        for name in SMALL_TRAJS:
            member = tar.getmember(f"trajs/{name}.traj")
            path = out / f"{name}.traj"
            path.write_bytes(tar.extractfile(member).read())
            frames[name] = read(str(path), index=":")
    return frames


@pytest.fixture(scope="module")
def trajs(cache_root):
    from equiformer.datasets.oc20 import OC20Trajectories

    return OC20Trajectories(root=cache_root, source=_need(TARBALL), trajectories=SMALL_TRAJS, dtype=torch.float64)


def _fixed(atoms) -> np.ndarray:
    from ase.constraints import FixAtoms

    mask = np.zeros(len(atoms), dtype=bool)
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            mask[c.get_indices()] = True
    return mask


# ---------------------------------------------------------------------------------------------
# trajectories
# ---------------------------------------------------------------------------------------------


def test_trajectory_frames_equal_ase_reading(trajs, ase_frames, cache_root):
    assert trajs.names == SMALL_TRAJS
    assert len(trajs) == sum(len(v) for v in ase_frames.values()) == 36 + 27
    assert (cache_root / "raw" / "trajs" / "random1000156.traj").is_file()  # extracted into root, not the repo
    k = 0
    for t, name in enumerate(SMALL_TRAJS):
        for f, atoms in enumerate(ase_frames[name]):
            d = trajs[k]
            res = atoms.calc.results
            np.testing.assert_array_equal(d.z.numpy(), atoms.numbers)
            np.testing.assert_array_equal(d.pos.numpy(), atoms.positions)
            np.testing.assert_array_equal(d.cell[0].numpy(), atoms.cell.array)
            np.testing.assert_array_equal(d.pbc[0].numpy(), atoms.pbc)
            assert float(d.energy) == res["energy"]
            np.testing.assert_array_equal(d.forces.numpy(), res["forces"])  # stored forces, fixed atoms included
            np.testing.assert_array_equal(d.fixed.numpy(), _fixed(atoms))
            np.testing.assert_array_equal(d.tags.numpy(), atoms.get_tags())
            assert int(d.sid) == int(name.removeprefix("random")) and int(d.fid) == f and int(d.traj_idx) == t
            k += 1
    assert trajs[0].fixed.any() and not trajs[0].fixed.all()
    assert bool(trajs[0].pbc.all())  # OC20 slabs: periodic in all three directions


def test_trajectory_cache_is_reused(cache_root, trajs, monkeypatch):
    import equiformer.datasets.oc20 as oc20

    def fail(*a, **k):
        raise AssertionError("frames were re-read instead of loaded from the cache")

    monkeypatch.setattr(oc20, "read_frames", fail)
    again = oc20.OC20Trajectories(root=cache_root, source=TARBALL, trajectories=SMALL_TRAJS, frame_stride=5,
                                  max_frames_per_trajectory=3)
    assert again.cache_path == trajs.cache_path
    assert again.frame_fid.tolist() == [0, 5, 10, 0, 5, 10]
    assert torch.equal(again[4].pos, trajs[36 + 5].pos.float())  # 2nd trajectory, frame 5
    assert again[0].pos.dtype == torch.float32


def test_split_by_trajectory(cache_root):
    from equiformer.datasets.oc20 import OC20Trajectories

    ds = OC20Trajectories(root=cache_root, source=_need(TARBALL), trajectories=5, frame_stride=7)
    split = ds.split({"train": 3, "val": 1, "test": None}, seed=3)
    all_items = torch.cat(list(split.values()))
    assert sorted(all_items.tolist()) == list(range(len(ds)))  # disjoint and complete
    traj_sets = {k: set(ds.frame_traj[v].tolist()) for k, v in split.items()}
    assert [len(traj_sets[k]) for k in ("train", "val", "test")] == [3, 1, 1]
    assert not (traj_sets["train"] & traj_sets["val"]) and not (traj_sets["train"] & traj_sets["test"])
    for name, items in split.items():  # every frame of a split's trajectories is in that split
        for t in traj_sets[name]:
            assert set(ds.trajectory_items(t).tolist()) <= set(items.tolist())
    assert all(torch.equal(a, b) for a, b in zip(split.values(), ds.split({"train": 3, "val": 1, "test": None}, seed=3).values()))
    fractions = ds.split(seed=1)  # default 80 % / 10 % / rest of 5 trajectories: every split non-empty
    assert all(len(set(ds.frame_traj[v].tolist())) >= 1 for v in fractions.values())


def test_split_covering_elements(cache_root, monkeypatch):
    """cover_elements: held-out trajectories contain only elements that training sees."""
    from equiformer.datasets.oc20 import OC20Trajectories

    ds = OC20Trajectories(root=cache_root, source=_need(TARBALL), trajectories=5, frame_stride=7)
    real = ds.trajectory_elements()
    assert real[0] == {int(z) for z in ds[0].z.unique()}
    fake = [{1, 8}, {1, 6}, {6, 8, 29}, {29, 1}, {78}]  # Pt (78) occurs once: that trajectory must train
    monkeypatch.setattr(ds, "trajectory_elements", lambda: fake)
    for seed in range(6):
        split = ds.trajectory_split({"train": None, "val": 1, "test": 1}, seed=seed, cover_elements=True)
        train = set(split["train"].tolist())
        assert 4 in train and len(train) == 3
        seen = set().union(*(fake[t] for t in train))
        assert all(fake[t] <= seen for k in ("val", "test") for t in split[k].tolist())
        items = ds.split({"train": None, "val": 1, "test": 1}, seed=seed, cover_elements=True)
        assert set(ds.frame_traj[items["val"]].tolist()) == set(split["val"].tolist())
    with pytest.raises(ValueError, match="cannot hold out 3 trajectories for 'test'"):
        ds.trajectory_split({"train": None, "val": 1, "test": 3}, seed=0, cover_elements=True)


def test_relaxation_pairs(trajs, ase_frames):
    pairs = trajs.relaxation_pairs()
    assert len(pairs) == 2
    for k, name in enumerate(SMALL_TRAJS):
        first, last = ase_frames[name][0], ase_frames[name][-1]
        d = pairs[k]
        np.testing.assert_array_equal(d.pos.numpy(), first.positions)
        np.testing.assert_array_equal(d.pos_relaxed.numpy(), last.positions)
        assert float(d.y_init) == first.calc.results["energy"]
        assert float(d.y_relaxed) == float(d.y[0, 0]) == last.calc.results["energy"]
        assert float(d.y_relaxed) < float(d.y_init)  # a relaxation lowers the energy
    assert {k: v.tolist() for k, v in pairs.split({"train": 1, "val": 1}, seed=0).items()} == \
        {k: v.tolist() for k, v in trajs.trajectory_split({"train": 1, "val": 1}, seed=0).items()}


def test_trajectory_errors(tmp_path, cache_root):
    from equiformer.datasets.oc20 import OC20Trajectories

    with pytest.raises(FileNotFoundError, match="nope.tar.gz"):
        OC20Trajectories(root=tmp_path, source=tmp_path / "nope.tar.gz")
    with pytest.raises(ValueError, match="no trajectory named 'random42'"):
        OC20Trajectories(root=cache_root, source=_need(TARBALL), trajectories=["random42"])
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "broken.traj").write_bytes(b"this is not an ASE trajectory")
    with pytest.raises(ValueError, match=r"broken\.traj: cannot read as a trajectory"):
        OC20Trajectories(root=tmp_path / "c", source=bad_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .traj"):
        OC20Trajectories(root=tmp_path / "c", source=empty)
    not_tar = tmp_path / "x.tar.gz"
    not_tar.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match=r"x\.tar\.gz"):
        OC20Trajectories(root=tmp_path / "c", source=not_tar)


# ---------------------------------------------------------------------------------------------
# OCP LMDB written here, in fairchem's format
# ---------------------------------------------------------------------------------------------


def _pyg1_pickle(fields: dict) -> bytes:
    """Bytes of a PyG 1.x-style Data pickle (the original OC20 LMDBs): a Data whose __dict__ holds
    the fields themselves (no ``_store``), as PyG 1.x wrote them."""
    obj = Data.__new__(Data)
    obj.__dict__.update(fields)
    obj.__dict__["__num_nodes__"] = None
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _slab_with_adsorbate():
    """Cu(111) 2x2x3 slab + O (fcc) + CO (hcp), OC20-style tags and fixed bottom layers, and
    Morse/EMT-free labels: energy and forces from ASE's EMT."""
    from ase.build import add_adsorbate, fcc111
    from ase.calculators.emt import EMT
    from ase.constraints import FixAtoms

    slab = fcc111("Cu", (2, 2, 3), vacuum=7.0)
    layer = slab.get_tags().copy()  # ASE: 1 = top layer
    add_adsorbate(slab, "O", 1.4, "fcc")
    add_adsorbate(slab, "C", 1.8, "hcp")
    slab.pbc = (True, True, True)
    tags = np.zeros(len(slab), dtype=int)
    tags[: len(layer)] = np.where(layer == 1, 1, 0)
    tags[len(layer):] = 2
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(mask=np.r_[layer >= 2, [False, False]]))
    slab.calc = EMT()
    slab.get_potential_energy()
    return slab


def _ocp_entry(z, pos, cell, tags, fixed, energy, forces, sid, fid, style: str):
    """One OCP record as fairchem writes it: float atomic numbers, float fixed, int natoms."""
    fields = {
        "pos": torch.tensor(pos, dtype=torch.float32),
        "cell": torch.tensor(cell, dtype=torch.float32).view(1, 3, 3),
        "atomic_numbers": torch.tensor(z, dtype=torch.float32),
        "natoms": int(len(z)),
        "tags": torch.tensor(tags, dtype=torch.long),
        "fixed": torch.tensor(fixed, dtype=torch.float32),
        "sid": int(sid),
        "fid": int(fid),
    }
    if style == "pyg1":  # original OC20 S2EF LMDBs: y / force, PyG 1.x object
        fields["y"] = float(energy)
        fields["force"] = torch.tensor(forces, dtype=torch.float32)
        return _pyg1_pickle(fields)
    fields["energy"] = float(energy)
    fields["forces"] = torch.tensor(forces, dtype=torch.float32)
    return pickle.dumps(Data(**fields), protocol=pickle.HIGHEST_PROTOCOL)


def _write_raw_lmdb(path: Path, values: list[bytes], length_key: bool = True) -> None:
    env = lmdb.open(str(path), subdir=False, map_size=1 << 30, meminit=False, map_async=True)
    with env.begin(write=True) as txn:
        for i, v in enumerate(values):
            txn.put(f"{i}".encode("ascii"), v)
        if length_key:
            txn.put(b"length", pickle.dumps(len(values), protocol=-1))
    env.sync()
    env.close()


@pytest.fixture(scope="module")
def s2ef_records(ase_frames):
    """(expected arrays, pickled value) of real OC20 frames and an ASE-built slab+adsorbate."""
    recs = []
    frames = ase_frames["random1000156"][::6] + ase_frames["random1000163"][::9]
    for k, atoms in enumerate(frames + [_slab_with_adsorbate()]):
        r = atoms.calc.results
        rec = dict(z=atoms.numbers.copy(), pos=atoms.positions.copy(), cell=atoms.cell.array.copy(),
                   tags=atoms.get_tags().copy(), fixed=_fixed(atoms), energy=float(r["energy"]),
                   forces=np.asarray(r["forces"]).copy(), sid=1000 + k, fid=k)
        recs.append((rec, _ocp_entry(style="pyg1" if k % 2 else "pyg2", **rec)))
    return recs


@pytest.fixture(scope="module")
def s2ef_lmdb(tmp_path_factory, s2ef_records) -> Path:
    """A folder of two shards: the first with a 'length' key, the second without (count from stat)."""
    folder = tmp_path_factory.mktemp("s2ef_lmdb")
    values = [v for _, v in s2ef_records]
    _write_raw_lmdb(folder / "data.0000.lmdb", values[:5], length_key=True)
    _write_raw_lmdb(folder / "data.0001.lmdb", values[5:], length_key=False)
    return folder


def _check_item(d, rec):
    f32 = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731 - stored as float32
    assert torch.equal(d.z, torch.tensor(rec["z"]))
    assert torch.equal(d.pos, f32(rec["pos"]))
    assert torch.equal(d.cell[0], f32(rec["cell"]))
    assert torch.equal(d.forces, f32(rec["forces"]))
    assert float(d.energy) == pytest.approx(rec["energy"], abs=0, rel=1e-7)
    assert torch.equal(d.tags, torch.tensor(rec["tags"]))
    assert torch.equal(d.fixed, torch.tensor(rec["fixed"]))
    assert d.pbc.tolist() == [[True, True, True]]
    assert int(d.sid) == rec["sid"] and int(d.fid) == rec["fid"]


def test_lmdb_written_in_ocp_format_reads_back(s2ef_lmdb, s2ef_records):
    from equiformer.datasets.oc20 import OC20LMDB

    ds = OC20LMDB(s2ef_lmdb, dtype=torch.float32)
    assert len(ds) == len(s2ef_records) and ds.shards.lengths == [5, len(s2ef_records) - 5]
    for i, (rec, _) in enumerate(s2ef_records):
        _check_item(ds[i], rec)
    assert set(ds.raw(1)) >= {"y", "force", "atomic_numbers"}  # PyG 1.x entry, original field names
    assert set(ds.raw(0)) >= {"energy", "forces"}
    slab = ds[len(ds) - 1]
    assert slab.tags.tolist().count(2) == 2 and (slab.tags == 1).sum() == 4 and slab.fixed.sum() == 8
    assert ds[-1].idx.tolist() == [len(ds) - 1]


def test_lmdb_two_dataloader_workers(s2ef_lmdb, s2ef_records):
    from equiformer.datasets.oc20 import OC20LMDB

    ds = OC20LMDB(s2ef_lmdb, dtype=torch.float32)
    ds[0]  # the parent opens its environments first: workers must not reuse them
    loader = DataLoader(ds, batch_size=3, shuffle=False, num_workers=2)
    seen = []
    for batch in loader:
        for d in batch.to_data_list():
            _check_item(d, s2ef_records[int(d.idx)][0])
            seen.append(int(d.idx))
    assert seen == list(range(len(ds)))


def test_lmdb_is2re_fields(tmp_path, ase_frames):
    from equiformer.datasets.oc20 import OC20LMDB

    values, expected = [], []
    for name in SMALL_TRAJS:
        first, last = ase_frames[name][0], ase_frames[name][-1]
        fields = {"pos": torch.tensor(first.positions, dtype=torch.float32),
                  "cell": torch.tensor(first.cell.array, dtype=torch.float32).view(1, 3, 3),
                  "atomic_numbers": torch.tensor(first.numbers, dtype=torch.float32), "natoms": len(first),
                  "tags": torch.zeros(len(first), dtype=torch.long),
                  "fixed": torch.tensor(_fixed(first), dtype=torch.float32),
                  "y_init": float(first.calc.results["energy"]), "y_relaxed": float(last.calc.results["energy"]),
                  "pos_relaxed": torch.tensor(last.positions, dtype=torch.float32), "sid": int(name[6:])}
        values.append(_pyg1_pickle(fields))
        expected.append((first, last))
    _write_raw_lmdb(tmp_path / "data.lmdb", values)
    ds = OC20LMDB(tmp_path / "data.lmdb", dtype=torch.float32)
    for d, (first, last) in zip(ds, expected):
        assert float(d.y_relaxed) == pytest.approx(last.calc.results["energy"], rel=1e-7)
        assert float(d.y[0, 0]) == float(d.y_relaxed)
        assert float(d.y_init) == pytest.approx(first.calc.results["energy"], rel=1e-7)
        assert torch.equal(d.pos_relaxed, torch.tensor(last.positions, dtype=torch.float32))
        assert not hasattr(d, "energy") or d.energy is None
    assert [int(d.sid) for d in ds] == [int(n[6:]) for n in SMALL_TRAJS]


# ---------------------------------------------------------------------------------------------
# restricted unpickling and errors
# ---------------------------------------------------------------------------------------------


class _StorageBytes:
    """Pickles like a tensor's storage: ``torch.storage._load_from_bytes(payload)``."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __reduce__(self):
        import torch.storage

        return (torch.storage._load_from_bytes, (self.payload,))


def _torch_saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_restricted_unpickler_refuses_code(tmp_path):
    from equiformer.datasets.oc20 import OC20LMDB
    from equiformer.datasets.ocp_pickle import UnsafePickleError, safe_loads

    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(f"touch {marker}"))
    assert b"system" in evil
    # as a whole entry
    _write_raw_lmdb(tmp_path / "evil.lmdb", [evil])
    with pytest.raises(UnsafePickleError, match=r"evil\.lmdb\[key 0\].*(posix|os)\.system"):
        OC20LMDB(tmp_path / "evil.lmdb")[0]
    # hidden inside an otherwise valid Data object
    hidden = pickle.dumps(Data(pos=torch.zeros(1, 3), atomic_numbers=torch.ones(1), payload=_Evil(f"touch {marker}")))
    with pytest.raises(UnsafePickleError):
        safe_loads(hidden, "hidden")
    # inside a tensor's storage bytes: a pickled tensor makes the unpickler call
    # torch.storage._load_from_bytes(b), which is torch.load(b, weights_only=False)
    control = tmp_path / "control"
    nested = pickle.dumps(_StorageBytes(_torch_saved(_Evil(f"touch {marker}"))))
    assert b"_load_from_bytes" in nested and b"posix" not in nested.split(b"_load_from_bytes")[0]
    pickle.loads(pickle.dumps(_StorageBytes(_torch_saved(_Evil(f"touch {control}")))))  # plain pickle runs it
    assert control.exists()
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|not allowed"):
        safe_loads(nested, "nested")
    for name in ("builtins eval", "subprocess Popen", "torch load", "numpy load"):
        module, attr = name.split()
        with pytest.raises(UnsafePickleError, match=f"{module}.{attr}"):
            safe_loads(b"\x80\x04c" + f"{module}\n{attr}\n".encode() + b".", "x")
    assert not marker.exists()
    # what real entries need still loads
    d = safe_loads(pickle.dumps(Data(pos=torch.randn(2, 3), arr=np.arange(3), s={1}, y=np.float64(2.5))), "ok")
    assert d.pos.shape == (2, 3) and d.arr.tolist() == [0, 1, 2] and d.y == 2.5


def test_lmdb_errors(tmp_path, monkeypatch):
    from equiformer.datasets.oc20 import OC20LMDB

    with pytest.raises(FileNotFoundError, match="missing.lmdb: no such LMDB"):
        OC20LMDB(tmp_path / "missing.lmdb")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: folder holds no \*\.lmdb"):
        OC20LMDB(tmp_path / "empty")
    junk = tmp_path / "junk.lmdb"
    junk.write_bytes(os.urandom(8192))
    with pytest.raises(ValueError, match=r"junk\.lmdb: not a readable LMDB"):
        OC20LMDB(junk)
    _write_raw_lmdb(tmp_path / "nopos.lmdb", [pickle.dumps(Data(atomic_numbers=torch.ones(2)))])
    with pytest.raises(StructureError, match=r"nopos\.lmdb\[key 0\]: record has no 'pos'"):
        OC20LMDB(tmp_path / "nopos.lmdb")[0]
    bad_natoms = Data(pos=torch.zeros(2, 3), atomic_numbers=torch.tensor([1.0, 8.0]), natoms=3, cell=torch.eye(3).view(1, 3, 3) * 10)
    _write_raw_lmdb(tmp_path / "natoms.lmdb", [pickle.dumps(bad_natoms)])
    with pytest.raises(StructureError, match=r"natoms\.lmdb\[key 0\]: natoms=3 but 2"):
        OC20LMDB(tmp_path / "natoms.lmdb")[0]
    _write_raw_lmdb(tmp_path / "short.lmdb", [b"\x80\x04\x95garbage"])
    with pytest.raises(ValueError, match=r"short\.lmdb\[key 0\]: cannot unpickle"):
        OC20LMDB(tmp_path / "short.lmdb")[0]
    with pytest.raises(IndexError, match="out of range"):
        OC20LMDB(tmp_path / "short.lmdb")[5]
    import sys

    monkeypatch.setitem(sys.modules, "lmdb", None)
    with pytest.raises(ImportError, match="pip install lmdb"):
        OC20LMDB(tmp_path / "short.lmdb")


# ---------------------------------------------------------------------------------------------
# ASE databases
# ---------------------------------------------------------------------------------------------


def test_ase_db_written_and_read(tmp_path):
    from ase.build import molecule
    from ase.calculators.emt import EMT
    from ase.db import connect

    from equiformer.datasets.ase_db import ASEDatabase

    slab = _slab_with_adsorbate()
    mol = molecule("CH3OH")
    mol.calc = EMT()
    mol.get_potential_energy()
    path = tmp_path / "structs.db"
    with connect(str(path)) as db:
        db.write(slab, name="cu111_o_c", ads_energy=-1.25)
        db.write(mol, name="methanol", ads_energy=0.5)
    ds = ASEDatabase(path, targets=["ads_energy"], name_key="name", dtype=torch.float64)
    assert len(ds) == 2
    for d, atoms, target in zip(ds, (slab, mol), (-1.25, 0.5)):
        np.testing.assert_allclose(d.pos.numpy(), atoms.positions, rtol=0, atol=1e-12)
        assert float(d.energy) == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
        np.testing.assert_allclose(d.forces.numpy(), atoms.calc.results["forces"], atol=1e-10)
        assert d.y.tolist() == [[target]]
        np.testing.assert_array_equal(d.tags.numpy(), atoms.get_tags())
    assert ds[0].name == "cu111_o_c" and ds[0].fixed.sum() == 8 and ds[0].pbc.all()
    assert ds[1].name == "methanol" and not ds[1].pbc.any() and not ds[1].fixed.any()
    with pytest.raises(StructureError, match=r"structs\.db\[id=1\]: row has no value 'band_gap'"):
        ASEDatabase(path, targets=["band_gap"])[0]


def test_bulks_db():
    from ase.db import connect

    from equiformer.datasets.ase_db import ASEDatabase

    path = _need(BULKS)
    ds = ASEDatabase(path, name_key="mpid")
    db = connect(str(path))
    assert len(ds) == db.count() == 1478
    for i in (0, 700, 1477):
        row = db.get(id=ds.ids[i])
        atoms = row.toatoms()
        d = ds[i]
        np.testing.assert_allclose(d.pos.numpy(), atoms.positions, atol=1e-5)
        np.testing.assert_allclose(d.cell[0].numpy(), atoms.cell.array, atol=1e-5)
        assert d.name == row.mpid and d.name.startswith(("mp-", "mvc-"))  # MP ids (mvc-: MP "sandbox")
        assert float(d.energy) == pytest.approx(row.energy, rel=1e-6)
        assert d.pbc.all()
    loader = DataLoader(torch.utils.data.Subset(ds, range(8)), batch_size=4, num_workers=2)
    assert sum(b.num_graphs for b in loader) == 8


def test_ase_db_errors(tmp_path):
    from equiformer.datasets.ase_db import ASEDatabase

    with pytest.raises(FileNotFoundError, match="nothing.db: no such ASE database"):
        ASEDatabase(tmp_path / "nothing.db")
    assert not (tmp_path / "nothing.db").exists()  # not silently created
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(ValueError, match=r"junk\.db: cannot read as an ASE database"):
        ASEDatabase(junk)


# ---------------------------------------------------------------------------------------------
# S2EF extxyz -> LMDB conversion (the download pipeline's last step, offline)
# ---------------------------------------------------------------------------------------------


def test_convert_s2ef_extxyz(tmp_path, ase_frames):
    from ase.io import write

    from equiformer.datasets.download import convert_s2ef_extxyz
    from equiformer.datasets.oc20 import OC20LMDB

    frames = ase_frames["random1000156"][:6]
    for a in frames:
        a.set_tags(np.where(_fixed(a), 0, 1))
    src = tmp_path / "raw"
    src.mkdir()
    buf = io.StringIO()
    write(buf, frames, format="extxyz")
    (src / "0.extxyz.xz").write_bytes(lzma.compress(buf.getvalue().encode()))
    refs = [-50.0 - 0.25 * k for k in range(len(frames))]
    lines = "".join(f"random1000156,frame{k * 3},{refs[k]}\n" for k in range(len(frames)))
    (src / "0.txt.xz").write_bytes(lzma.compress(lines.encode()))
    n = convert_s2ef_extxyz(src, tmp_path / "lmdb", num_shards=1)
    assert n == len(frames)
    ds = OC20LMDB(tmp_path / "lmdb", dtype=torch.float64)
    for k, (d, a) in enumerate(zip(ds, frames)):
        assert float(d.energy) == pytest.approx(a.calc.results["energy"] - refs[k], abs=1e-5)
        np.testing.assert_allclose(d.forces.numpy(), a.calc.results["forces"], atol=1e-6)
        np.testing.assert_allclose(d.pos.numpy(), a.positions, atol=1e-6)
        np.testing.assert_array_equal(d.fixed.numpy(), _fixed(a))
        np.testing.assert_array_equal(d.tags.numpy(), a.get_tags())
        assert int(d.sid) == 1000156 and int(d.fid) == 3 * k
    (src / "0.txt.xz").write_bytes(lzma.compress(b"random1000156,frame0,-50.0\n"))
    with pytest.raises(ValueError, match=r"0\.extxyz\.xz: more frames than lines in .*0\.txt\.xz"):
        convert_s2ef_extxyz(src, tmp_path / "lmdb2")
