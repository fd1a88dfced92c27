"""JARVIS-DFT adapter on real JARVIS data: ALIGNN's sample folder (50 POSCARs + id_prop.csv,
tests/files/jarvis_sample) checked against ASE's and pymatgen's POSCAR readers, the official
jarvis-leaderboard split (restricted to those 50 ids), ALIGNN's random split, and the dft_3d
JSON format (written here from the same POSCARs with the leaderboard's real labels)."""

from __future__ import annotations

import csv
import json
import logging
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

ase_io = pytest.importorskip("ase.io")
pmg_vasp = pytest.importorskip("pymatgen.io.vasp")

from equiformer.datasets.jarvis import (  # noqa: E402
    JarvisDFT3D,
    alignn_split_indices,
    leaderboard_split,
    read_id_prop,
)

SAMPLE = Path(__file__).resolve().parent / "files" / "jarvis_sample"
LEADERBOARD = SAMPLE / "leaderboard"
TOL = 1e-6


def split_file(prop: str) -> Path:
    return LEADERBOARD / f"dft_3d_{prop}.json.zip"


def raw_leaderboard(prop: str) -> dict:
    with zipfile.ZipFile(split_file(prop)) as z:
        return json.loads(z.read(f"dft_3d_{prop}.json"))


@pytest.fixture(scope="module")
def id_prop() -> list[tuple[str, float]]:
    with open(SAMPLE / "id_prop.csv", newline="") as f:
        return [(r[0], float(r[1])) for r in csv.reader(f)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jarvis_cache")


@pytest.fixture(scope="module")
def folder(root) -> JarvisDFT3D:
    return JarvisDFT3D(SAMPLE, root=root, id_prop_label="optb88vdw_bandgap", split=None, dtype=torch.float64,
                       progress=False)


def assert_same_as_ase(data, path: Path) -> None:
    atoms = ase_io.read(str(path), format="vasp")
    np.testing.assert_allclose(data.cell[0].double().numpy(), atoms.cell.array, atol=TOL, rtol=0)
    assert data.z.tolist() == atoms.numbers.tolist()
    np.testing.assert_allclose(data.pos.double().numpy(), atoms.positions, atol=TOL, rtol=0)
    assert torch.equal(data.pbc, torch.ones(1, 3, dtype=torch.bool))


# ------------------------------------------------------------------------------- POSCAR folder


def test_folder_against_ase_and_pymatgen(folder, id_prop):
    assert len(folder) == 50 and not folder.skipped and folder.official_split() is None
    assert folder.ids == [name[len("POSCAR-") : -len(".vasp")] for name, _ in id_prop]
    for i, (name, gap) in enumerate(id_prop):
        d = folder[i]
        assert_same_as_ase(d, SAMPLE / name)
        s = pmg_vasp.Poscar.from_file(str(SAMPLE / name)).structure
        np.testing.assert_allclose(d.cell[0].numpy(), s.lattice.matrix, atol=TOL, rtol=0)
        np.testing.assert_allclose(d.pos.numpy(), s.cart_coords, atol=TOL, rtol=0)
        assert d.z.tolist() == [site.specie.Z for site in s]
        assert d.y.tolist() == [[gap]] and d.material_id == name[len("POSCAR-") : -len(".vasp")]
    assert folder.target_names == ["optb88vdw_bandgap"] and folder.target_infos[0].unit == "eV"
    assert sum(v > 0 for _, v in id_prop) == int((folder.y_table > 0).sum()) > 5  # real gaps, metals at 0


def test_read_id_prop_and_unlisted_files(id_prop):
    assert read_id_prop(SAMPLE) == id_prop
    assert len(list(SAMPLE.glob("POSCAR-*.vasp"))) == 70  # 20 files are not in id_prop.csv and are not read


def test_cache_hit(root, folder):
    again = JarvisDFT3D(SAMPLE, root=root, id_prop_label="optb88vdw_bandgap", split=None, dtype=torch.float64,
                        progress=False)
    assert again.cache_hit and not folder.cache_hit and again.cache_path == folder.cache_path
    assert torch.equal(again.pos64, folder.pos64) and again.ids == folder.ids


def test_parallel_processing_is_identical(tmp_path, folder):
    par = JarvisDFT3D(SAMPLE, root=tmp_path, id_prop_label="optb88vdw_bandgap", split=None, dtype=torch.float64,
                      progress=False, processes=2)
    assert not par.cache_hit and par.ids == folder.ids
    assert torch.equal(par.pos64, folder.pos64) and torch.equal(par.cell64, folder.cell64)
    assert torch.equal(par.z, folder.z) and torch.equal(par.y_table, folder.y_table)


def test_leaderboard_split(root, id_prop):
    raw = raw_leaderboard("optb88vdw_bandgap")
    ds = JarvisDFT3D(SAMPLE, root=root, id_prop_label="optb88vdw_bandgap",
                     split_file=split_file("optb88vdw_bandgap"), labels="split", progress=False)
    assert ds.split_protocol == "leaderboard" and ds.cache_hit  # the split does not change the cache
    split = ds.official_split()
    assert {k: len(v) for k, v in split.items()} == {"train": 44, "val": 2, "test": 4}
    for name, rows in split.items():
        assert {ds.ids[int(k)] for k in rows} == set(raw[name])
    gaps = {name[len("POSCAR-") : -len(".vasp")]: v for name, v in id_prop}
    leader = {i: v for part in raw.values() for i, v in part.items()}
    assert max(abs(leader[i] - gaps[i]) for i in gaps) < 1e-6  # the leaderboard's labels are id_prop's
    np.testing.assert_allclose(ds.y_table[:, 0].numpy(), [leader[i] for i in ds.ids], rtol=0, atol=0)
    assert leaderboard_split(split_file("optb88vdw_bandgap"))["val"] == {k: float(v) for k, v in raw["val"].items()}
    with pytest.raises(FileNotFoundError, match="no leaderboard split file"):
        JarvisDFT3D(SAMPLE, root=root, id_prop_label="optb88vdw_bandgap", split="leaderboard", progress=False)


def test_alignn_split(root):
    ds = JarvisDFT3D(SAMPLE, root=root, id_prop_label="optb88vdw_bandgap", split="alignn", progress=False)
    split = ds.official_split()
    assert {k: len(v) for k, v in split.items()} == {"train": 40, "val": 5, "test": 5}
    order = list(range(50))
    random.seed(123)
    random.shuffle(order)  # ALIGNN: random.seed(split_seed); random.shuffle(ids)
    assert split["train"].tolist() == sorted(order[:40]) and split["test"].tolist() == sorted(order[-5:])
    sizes = {k: len(v) for k, v in alignn_split_indices(55_723).items()}
    assert sizes == {"train": 44_578, "val": 5_572, "test": 5_572}  # ComFormer's JARVIS numbers
    parts = alignn_split_indices(1001)
    assert len(set(parts["train"]) | set(parts["val"]) | set(parts["test"])) == 800 + 100 + 100


# ------------------------------------------------------------------------------- dft_3d JSON


@pytest.fixture(scope="module")
def dft3d_json(tmp_path_factory, id_prop) -> Path:
    """A dft_3d-format JSON of the 50 sample structures: atoms dicts as jarvis-tools writes them
    (fractional coordinates; every third entry Cartesian), with real labels: the OptB88vdW gap
    from id_prop.csv and the formation energy and mbj gap from the leaderboard ("na" if none)."""
    eform = {i: v for part in raw_leaderboard("formation_energy_peratom").values() for i, v in part.items()}
    mbj = {i: v for part in raw_leaderboard("mbj_bandgap").values() for i, v in part.items()}
    entries = []
    for k, (name, gap) in enumerate(id_prop):
        atoms = ase_io.read(str(SAMPLE / name), format="vasp")
        jid = name[len("POSCAR-") : -len(".vasp")]
        cart = k % 3 == 0
        entries.append({
            "jid": jid,
            "atoms": {"lattice_mat": atoms.cell.array.tolist(),
                      "coords": (atoms.positions if cart else atoms.get_scaled_positions(wrap=False)).tolist(),
                      "elements": atoms.get_chemical_symbols(), "abc": atoms.cell.lengths().tolist(),
                      "angles": atoms.cell.angles().tolist(), "cartesian": cart, "props": [""] * len(atoms)},
            "formation_energy_peratom": eform[jid],
            "optb88vdw_bandgap": gap,
            "mbj_bandgap": mbj.get(jid, "na"),
            "hse_gap": "na",
        })
    path = tmp_path_factory.mktemp("dft3d") / "jdft_3d-sample.json.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("jdft_3d-sample.json", json.dumps(entries))
    return path


def test_dft3d_json(root, dft3d_json, id_prop):
    ds = JarvisDFT3D(dft3d_json, root=root, targets="formation_energy_peratom", split=None, dtype=torch.float64,
                     progress=False)
    assert len(ds) == 50 and ds.target_infos[0].unit == "eV/atom"
    eform = {i: v for part in raw_leaderboard("formation_energy_peratom").values() for i, v in part.items()}
    for i, (name, _) in enumerate(id_prop):
        d = ds[i]
        assert d.material_id == ds.ids[i] == name[len("POSCAR-") : -len(".vasp")]
        assert_same_as_ase(d, SAMPLE / name)
        assert float(d.y) == eform[d.material_id]
    assert -4 < float(ds.y_table.min()) < float(ds.y_table.max()) < 3  # eV/atom


def test_dft3d_missing_values_and_multi_targets(root, dft3d_json):
    mbj = JarvisDFT3D(dft3d_json, root=root, targets="mbj_bandgap", split=None, progress=False)
    assert mbj.cache_hit and len(mbj) == 13 and mbj.num_missing == 37  # "na" entries are left out, not errors
    both = JarvisDFT3D(dft3d_json, root=root, targets=["optb88vdw_bandgap", "mbj_gap"], split=None, progress=False)
    assert both.target_names == ["optb88vdw_bandgap", "mbj_bandgap"] and both.ids == mbj.ids
    assert bool((both.y_table[:, 1] >= both.y_table[:, 0] - 1e-9).all())  # TBmBJ gaps >= OptB88vdW gaps here
    with pytest.raises(ValueError, match="no structure .* has all targets"):
        JarvisDFT3D(dft3d_json, root=root, targets="hse_gap", split=None, progress=False)
    lb = JarvisDFT3D(dft3d_json, root=root, targets="mbj_bandgap", split_file=split_file("mbj_bandgap"),
                     progress=False)
    assert {k: len(v) for k, v in lb.official_split().items()} == {"train": 11, "test": 2}


def test_bad_entries_are_listed(tmp_path, caplog):
    atoms = ase_io.read(str(SAMPLE / "POSCAR-JVASP-1372.vasp"), format="vasp")
    good = {"lattice_mat": atoms.cell.array.tolist(), "coords": atoms.get_scaled_positions().tolist(),
            "elements": atoms.get_chemical_symbols(), "cartesian": False}
    entries = [
        {"jid": "JVASP-1372", "atoms": good, "formation_energy_peratom": -0.3},
        {"jid": "JVASP-x1", "atoms": dict(good, elements=["Al", "Qq"]), "formation_energy_peratom": 0.1},
        {"jid": "JVASP-x2", "atoms": dict(good, coords=[[0, 0, 0], [0, 0, 0.001]]), "formation_energy_peratom": 0.1},
        {"jid": "JVASP-x3", "atoms": dict(good, lattice_mat=[[1, 0, 0], [2, 0, 0], [0, 0, 1]]),
         "formation_energy_peratom": 0.1},
        {"jid": "JVASP-x4", "atoms": {"coords": [[0, 0, 0]]}, "formation_energy_peratom": 0.1},
    ]
    path = tmp_path / "dft_3d_bad.json"
    path.write_text(json.dumps(entries))
    with caplog.at_level(logging.WARNING, logger="equiformer.datasets"):
        ds = JarvisDFT3D(path, root=tmp_path / "c", split=None, progress=False)
    assert ds.ids == ["JVASP-1372"]
    reasons = {s.id: s.reason for s in ds.skipped}
    assert "unknown element 'Qq'" in reasons["JVASP-x1"]
    assert "overlap" in reasons["JVASP-x2"]
    assert "degenerate cell" in reasons["JVASP-x3"]
    assert "no 'lattice_mat'" in reasons["JVASP-x4"]
    assert all(r.startswith("dft_3d_bad.json JVASP-x") for r in reasons.values())
    assert "4 of 5 structures rejected" in caplog.text


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown JARVIS-DFT property 'homo'"):
        JarvisDFT3D(SAMPLE, root=tmp_path, targets="homo")
    with pytest.raises(ValueError, match="holds only 'target'"):
        JarvisDFT3D(SAMPLE, root=tmp_path, targets="formation_energy_peratom", split=None)
    with pytest.raises(FileNotFoundError, match="not found"):
        JarvisDFT3D(tmp_path / "jdft_3d.json", root=tmp_path, split=None)
    (tmp_path / "f").mkdir()
    with pytest.raises(FileNotFoundError, match="no id_prop.csv"):
        JarvisDFT3D(tmp_path / "f", root=tmp_path, split=None)
    (tmp_path / "f" / "id_prop.csv").write_text("POSCAR-1.vasp,1.0\n")
    with pytest.raises(FileNotFoundError, match="line 1: structure file POSCAR-1.vasp not found"):
        JarvisDFT3D(tmp_path / "f", root=tmp_path, split=None)
    bad = tmp_path / "list.json"
    bad.write_text(json.dumps({"jid": "x"}))
    with pytest.raises(ValueError, match="JSON list of entries"):
        JarvisDFT3D(bad, root=tmp_path, split=None)
