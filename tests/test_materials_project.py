"""Materials Project adapters on the real offline tables (../shared/data/materials_project):
structures against pymatgen's own reading, labels against the CSV / split files read here
independently, the official MEGNet split, the matbench and mp.2018.6.1 file formats, the
mp-api client path (with a stand-in client), rejected structures and the cache."""

from __future__ import annotations

import ast
import csv
import gzip
import json
import logging
import math
import os
import sys
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

pd = pytest.importorskip("pandas")
pmg = pytest.importorskip("pymatgen.core")

from equiformer.datasets.materials_project import (  # noqa: E402
    MEGNET_SPLIT_SIZES,
    MaterialsProject,
    MPBandGap,
    MPElastic,
    MPFormationEnergy,
    fetch_materials_project,
    megnet_split,
    megnet_split_ids,
    read_mp_csv,
)
from equiformer.datasets.matbench import Matbench, matbench_fold_indices  # noqa: E402

DATA = Path(os.environ.get("EQUIFORMER_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
MP = DATA / "materials_project"
FILES = Path(__file__).resolve().parent / "files"
if not (MP / "flla_2015.csv").is_file():
    pytest.skip(f"shared MP data not found in {MP}", allow_module_level=True)

N = 150  # structures processed in the fast tests (the first rows of each table)
TOL = 1e-6  # Å


def raw_split(name: str) -> dict:
    with zipfile.ZipFile(MP / "megnet_splits" / f"megnet_{name}.json.zip") as z:
        return json.loads(z.read(f"megnet_{name}.json"))


@pytest.fixture(scope="module")
def flla() -> pd.DataFrame:
    return pd.read_csv(MP / "flla_2015.csv", comment="#")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("mp_cache"))


@pytest.fixture(scope="module")
def eform(root) -> MPFormationEnergy:
    return MPFormationEnergy(root=root, subset=N, data_dir=DATA, dtype=torch.float64, progress=False)


def pmg_of(d) -> "pmg.Structure":
    return pmg.Structure.from_dict(ast.literal_eval(d) if isinstance(d, str) else d)


def pmg_cif(text: str) -> "pmg.Structure":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fractional coordinates rounded to ideal values"
        return pmg.Structure.from_str(text, fmt="cif")


def assert_same_structure(data, s, tol=TOL) -> None:
    """``data`` (contract) equals the pymatgen Structure ``s``: lattice, species, positions."""
    assert torch.equal(data.pbc, torch.ones(1, 3, dtype=torch.bool))
    np.testing.assert_allclose(data.cell[0].double().numpy(), s.lattice.matrix, atol=tol, rtol=0)
    assert data.z.tolist() == [site.specie.Z for site in s]
    np.testing.assert_allclose(data.pos.double().numpy(), s.cart_coords, atol=tol, rtol=0)


# ------------------------------------------------------------------------------- split files


def test_megnet_split_files():
    e, g = megnet_split("e_form", data_dir=DATA), megnet_split("gap", data_dir=DATA)
    assert {k: len(v) for k, v in e.items()} == MEGNET_SPLIT_SIZES == {"train": 60_000, "val": 5_000, "test": 4_239}
    for k in e:
        assert set(e[k]) == set(g[k])  # one split for both targets
    ids = megnet_split_ids(data_dir=DATA)
    assert len(ids) == 69_239 and ids["mp-1000"] == "train"
    allv = np.array([v for part in e.values() for v in part.values()])
    assert np.isfinite(allv).all() and -5 < allv.min() < allv.max() < 5  # eV/atom
    gaps = np.array([v for part in g.values() for v in part.values()])
    assert gaps.min() >= 0 and gaps.max() < 20  # eV


def test_split_labels_agree_with_flla(flla):
    """MEGNet's MP-2018.6.1 formation energies vs flla_2015's (MP 2015) for the shared ids:
    the same ids and close values (MP recomputed its energies between the two versions)."""
    lab = {i: float(v) for part in raw_split("e_form").values() for i, v in part.items()}
    shared = flla[flla.material_id.isin(lab)]
    diff = np.abs(shared.material_id.map(lab).to_numpy() - shared.formation_energy_per_atom.to_numpy())
    print(f"\nflla_2015 vs MEGNet e_form on {len(shared)} shared ids: max {diff.max():.4f} eV/atom "
          f"({shared.material_id.iloc[diff.argmax()]}), median {np.median(diff) * 1e3:.2f} meV/atom, "
          f"{(diff < 1e-6).sum()} within 1e-6")
    assert len(shared) == 3909
    assert np.median(diff) < 2e-3 and np.quantile(diff, 0.95) < 1e-2 and diff.max() < 0.5
    assert (diff < 1e-6).sum() > 100
    # a wrong join (labels shifted by one id) would be off by ~1 eV/atom
    shifted = np.abs(np.roll(shared.material_id.map(lab).to_numpy(), 1) - shared.formation_energy_per_atom.to_numpy())
    assert np.median(shifted) > 0.3


# ------------------------------------------------------------------------------- flla_2015 + MEGNet split


def test_flla_structures_labels_and_split(eform, flla):
    ids = megnet_split_ids(data_dir=DATA)
    labels = {i: float(v) for part in raw_split("e_form").values() for i, v in part.items()}
    rows = flla.head(N)
    expected = [m for m in rows.material_id if m in ids]
    assert eform.ids == expected and len(eform) == len(expected) and not eform.skipped
    assert eform.num_outside_split == N - len(expected)
    by_id = rows.set_index("material_id")
    for i in range(len(eform)):
        d = eform[i]
        assert_same_structure(d, pmg_of(by_id.loc[d.material_id, "structure"]))
        assert d.y.shape == (1, 1) and abs(float(d.y) - labels[d.material_id]) < 1e-12
        assert d.cell.shape == (1, 3, 3) and d.z.dtype == torch.long and int(d.idx) == i
    split = eform.official_split()
    for name, rows_ in split.items():
        assert all(ids[eform.ids[int(k)]] == name for k in rows_)
    assert sum(len(v) for v in split.values()) == len(eform)
    assert eform.target_infos[0].unit == "eV/atom" and eform.target_infos[0].to_report(0.0183) == pytest.approx(18.3)
    assert torch.equal(eform.atomrefs(), torch.zeros(1, 119, dtype=torch.float64))


def test_labels_from_source_and_random_protocol(root, flla):
    src = MPFormationEnergy(root=root, subset=N, data_dir=DATA, labels="source", dtype=torch.float64, progress=False)
    by_id = flla.head(N).set_index("material_id").formation_energy_per_atom
    np.testing.assert_array_equal(src.y_table[:, 0].numpy(), by_id.loc[src.ids].to_numpy())
    everything = MaterialsProject(root=root, subset=N, data_dir=DATA, split=None, labels="source", progress=False)
    assert len(everything) == N and everything.official_split() is None  # no split: all structures


def test_cache_hit(root, eform):
    again = MPFormationEnergy(root=root, subset=N, data_dir=DATA, dtype=torch.float64, progress=False)
    assert not eform.cache_hit and again.cache_hit and again.cache_path == eform.cache_path
    assert again.ids == eform.ids and torch.equal(again.pos64, eform.pos64)
    assert torch.equal(again.y_table, eform.y_table)
    assert again.load_seconds < eform.load_seconds  # reading the cache beats parsing 150 structures
    small = MPFormationEnergy(root=root, subset=20, data_dir=DATA, progress=False)
    assert not small.cache_hit and small.cache_path != eform.cache_path  # another subset, another file
    fresh = MPFormationEnergy(root=root, subset=20, data_dir=DATA, force_reload=True, progress=False)
    assert not fresh.cache_hit and fresh.ids == eform.ids[: len(fresh)]
    assert fresh[0].pos.dtype == torch.get_default_dtype()


def test_band_gap_join(root):
    gap = MPBandGap(root=root, subset=N, data_dir=DATA, progress=False)
    labels = {i: float(v) for part in raw_split("gappbe").values() for i, v in part.items()}
    np.testing.assert_array_equal(gap.y_table[:, 0].numpy(), [labels[i] for i in gap.ids])
    assert gap.target_names == ["gap"] and gap.target_infos[0].unit == "eV"
    both = MaterialsProject(root=root, subset=N, data_dir=DATA, targets="e_form,gap", progress=False)
    assert both.y_table.shape == (len(gap), 2) and both.ids == gap.ids
    with pytest.raises(ValueError, match="no structure of flla_2015.csv has all targets"):
        MPBandGap(root=root, subset=N, data_dir=DATA, labels="source", progress=False)  # flla has no gap


@pytest.mark.slow
def test_all_flla_structures(tmp_path, flla):
    ds = MPFormationEnergy(root=tmp_path, data_dir=DATA, progress=False)
    print("\nflla_2015 + MEGNet split:", ds.summary())
    assert ds.summary()["split"] == {"train": 3418, "val": 265, "test": 226}
    assert len(ds) == 3909 and ds.skipped == [] and ds.num_outside_split == 29


# ------------------------------------------------------------------------------- dielectric / elastic


def test_dielectric_shifted_header_and_cifs(root):
    path = MP / "dielectric_constant.csv"
    df = read_mp_csv(path)
    with open(path, newline="") as f:
        lines = (line for line in f if not line.startswith("#"))
        reader = csv.reader(lines)
        header = next(reader)
        raw = [next(reader) for _ in range(20)]
    assert all(len(r) == len(header) + 1 for r in raw)  # the shifted header
    for k, r in enumerate(raw):  # field j+1 of a row is header column j
        assert df.material_id.iloc[k] == r[header.index("material_id") + 1]
        assert df.band_gap.iloc[k] == float(r[header.index("band_gap") + 1])
    assert df.material_id.iloc[0] == "mp-441" and df.band_gap.iloc[0] == 1.88 and df.formula.iloc[0] == "Rb2Te"

    ds = MaterialsProject(root=root, structures="dielectric", targets="gap,n", split=None, subset=25, data_dir=DATA,
                          dtype=torch.float64, progress=False)
    assert len(ds) == 25 and not ds.skipped
    for i in range(len(ds)):
        d = ds[i]
        row = df.iloc[i]
        assert d.material_id == row.material_id and len(d.z) == row.nsites
        assert_same_structure(d, pmg_cif(row.structure), tol=1e-5)
        assert d.y[0].tolist() == [row.band_gap, row.n]


@pytest.mark.parametrize("subset", [pytest.param(None, marks=pytest.mark.slow), 100])
def test_dielectric_gaps_with_megnet_split(root, subset):
    """The dielectric table's structures joined to MEGNet's split; its gaps vs MEGNet's."""
    ds = MPBandGap(root=root, structures="dielectric", data_dir=DATA, subset=subset, progress=False)
    src = MPBandGap(root=root, structures="dielectric", labels="source", data_dir=DATA, subset=subset, progress=False)
    ids = megnet_split_ids(data_dir=DATA)
    table = read_mp_csv(MP / "dielectric_constant.csv").head(subset or 10**6)
    assert ds.ids == src.ids == [m for m in table.material_id if m in ids] and not ds.skipped
    assert ds.num_outside_split == len(table) - len(ds)
    diff = (ds.y_table - src.y_table).abs()[:, 0]
    print(f"\ndielectric band_gap vs megnet_gappbe on {len(ds)} ids: median {diff.median():.4f} eV, "
          f"max {diff.max():.3f} eV, {(diff > 0.01).sum()} differ by > 0.01 eV; split {ds.summary()['split']}")
    assert diff.median() < 0.01


def test_elastic_log_moduli(root):
    df = read_mp_csv(MP / "elastic_tensor.csv")
    ds = MPElastic(root=root, subset=20, data_dir=DATA, dtype=torch.float64, progress=False)
    assert ds.target_names == ["log_kvrh", "log_gvrh"] and ds.target_infos[0].unit == "log10(GPa)"
    assert ds.official_split() is None
    for i in range(len(ds)):
        row = df.iloc[i]
        d = ds[i]
        assert d.material_id == row.material_id and len(d.z) == row.nsites
        np.testing.assert_allclose(d.y[0].numpy(), [math.log10(row.K_VRH), math.log10(row.G_VRH)], rtol=1e-14)
        assert_same_structure(d, pmg_cif(row.structure), tol=1e-5)


# ------------------------------------------------------------------------------- other file formats


def _cif(s) -> str:
    from pymatgen.io.cif import CifWriter

    return str(CifWriter(s))


def test_mp2018_json_format(tmp_path, flla):
    """A file in the format of MEGNet's mp.2018.6.1.json (CIF strings), zipped like the download."""
    rows = flla.head(20)
    structures = [pmg_of(s) for s in rows.structure]
    entries = [{"material_id": m, "structure": _cif(s), "formation_energy_per_atom": e, "band_gap": 0.5}
               for m, s, e in zip(rows.material_id, structures, rows.formation_energy_per_atom)]
    path = tmp_path / "mp.2018.6.1.json.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mp.2018.6.1.json", json.dumps(entries))
    ds = MaterialsProject(root=tmp_path / "c", structures=path, split=None, labels="source", dtype=torch.float64,
                          progress=False)
    assert ds.ids == list(rows.material_id) and ds.cache_stem() == "mp_mp-2018-6-1-json-zip"
    for i, e in enumerate(entries):
        assert_same_structure(ds[i], pmg_cif(e["structure"]))  # pymatgen reading the same CIF text
        lat = pmg.Lattice(ds[i].cell[0].double().numpy())  # CIF keeps the lattice, not its orientation
        np.testing.assert_allclose(lat.parameters, structures[i].lattice.parameters, rtol=1e-7)
    np.testing.assert_array_equal(ds.y_table[:, 0].numpy(), rows.formation_energy_per_atom.to_numpy())
    official = MaterialsProject(root=tmp_path / "c", structures=path, data_dir=DATA, progress=False)
    ids = megnet_split_ids(data_dir=DATA)
    assert official.ids == [m for m in rows.material_id if m in ids]


def test_matbench_format(tmp_path, flla):
    """A matbench_mp_e_form-style file written from real flla structures."""
    rows = flla.head(23)
    dicts = [pmg_of(s).as_dict() for s in rows.structure]
    table = {"index": [f"mb-mp-e-form-{k:06d}" for k in range(len(rows))], "columns": ["structure", "e_form"],
             "data": [[d, float(e)] for d, e in zip(dicts, rows.formation_energy_per_atom)]}
    path = tmp_path / "matbench_mp_e_form.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(table, f)
    ds = Matbench(path, root=tmp_path / "c", fold=2, dtype=torch.float64, progress=False)
    assert ds.target_names == ["e_form"] and ds.target_infos[0].unit == "eV/atom" and len(ds) == 23
    for i in range(len(ds)):
        assert_same_structure(ds[i], pmg.Structure.from_dict(dicts[i]))
    np.testing.assert_array_equal(ds.y_table[:, 0].numpy(), rows.formation_energy_per_atom.to_numpy())
    split = ds.official_split()
    folds = [matbench_fold_indices(23, k)["test"] for k in range(5)]
    assert [len(f) for f in folds] == [5, 5, 5, 4, 4]
    assert torch.equal(torch.cat(folds).sort().values, torch.arange(23))
    assert torch.equal(split["test"], folds[2]) and len(split["train"]) == 18
    try:  # matbench's protocol is scikit-learn's KFold; compare when it is installed
        from sklearn.model_selection import KFold
    except ImportError:
        pass
    else:
        ref = [te for _, te in KFold(5, shuffle=True, random_state=18012019).split(np.arange(23))]
        assert all(np.array_equal(np.sort(r), f.numpy()) for r, f in zip(ref, folds))


class _FakeRester:
    """Stands in for mp_api's MPRester: serves flla structures as summary documents."""

    calls: list = []

    def __init__(self, api_key=None):
        self.api_key = api_key
        self.materials = types.SimpleNamespace(summary=types.SimpleNamespace(search=self._search))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _search(self, material_ids=None, fields=None, **criteria):
        _FakeRester.calls.append((self.api_key, material_ids, fields, criteria))
        out = []
        for m in material_ids:
            row = self.table.loc[m]
            out.append(types.SimpleNamespace(material_id=m, structure=pmg_of(row.structure),
                                             formation_energy_per_atom=row.formation_energy_per_atom, band_gap=1.5,
                                             bulk_modulus={"vrh": 100.0} if m == "mp-10" else None,
                                             shear_modulus=None))
        return out


def test_fetch_materials_project_client_path(tmp_path, monkeypatch, flla):
    _FakeRester.table = flla.set_index("material_id")
    client = types.ModuleType("mp_api.client")
    client.MPRester = _FakeRester
    monkeypatch.setitem(sys.modules, "mp_api", types.ModuleType("mp_api"))
    monkeypatch.setitem(sys.modules, "mp_api.client", client)
    monkeypatch.delenv("MP_API_KEY", raising=False)
    with pytest.raises(ValueError, match="MP_API_KEY"):
        fetch_materials_project(tmp_path / "x.json", ["mp-10"])
    monkeypatch.setenv("MP_API_KEY", "secret")
    ids = list(flla.material_id.head(12))
    path = fetch_materials_project(tmp_path / "mp_api.json", ids)
    key, asked, fields, _ = _FakeRester.calls[-1]
    assert key == "secret" and asked == ids and "structure" in fields and "formation_energy_per_atom" in fields
    ds = MaterialsProject(root=tmp_path / "c", structures=path, split=None, labels="source", targets="e_form,gap",
                          dtype=torch.float64, progress=False)
    assert ds.ids == ids
    for i, m in enumerate(ids):
        assert_same_structure(ds[i], pmg_of(_FakeRester.table.loc[m, "structure"]))
    assert ds.y_table[:, 1].tolist() == [1.5] * 12
    assert json.loads(path.read_text())[ids.index("mp-10")]["K_VRH"] == 100.0


def test_fetch_without_client(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mp_api", None)
    with pytest.raises(ImportError, match="pip install mp-api"):
        fetch_materials_project(tmp_path / "x.json", ["mp-10"], api_key="k")


# ------------------------------------------------------------------------------- errors


@pytest.mark.filterwarnings("ignore:Not all sites have property")
def test_rejected_structures_are_listed(tmp_path, flla, caplog):
    """Partial occupancy, a missing cell and overlapping atoms: skipped with the reason and
    counted in a warning; the valid structures around them are kept."""
    good = [pmg_of(s).as_dict() for s in flla.structure.head(3)]
    overlap = pmg_of(flla.structure.iloc[5])
    overlap.append(overlap[0].specie, overlap[0].frac_coords + 0.001)
    entries = [
        {"material_id": "mp-10", "structure": good[0], "formation_energy_per_atom": 0.1},
        {"material_id": "x-partial", "structure": (FILES / "malformed" / "NaCl_partial.cif").read_text(),
         "formation_energy_per_atom": 0.0},
        {"material_id": "x-nocell", "structure": (FILES / "malformed" / "TiO2_nocell.cif").read_text(),
         "formation_energy_per_atom": 0.0},
        {"material_id": "x-overlap", "structure": overlap.as_dict(), "formation_energy_per_atom": 0.0},
        {"material_id": "mp-10", "structure": good[1], "formation_energy_per_atom": 0.2},
        {"material_id": "mp-10000", "structure": good[2], "formation_energy_per_atom": 0.3},
    ]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(entries))
    with caplog.at_level(logging.WARNING, logger="equiformer.datasets"):
        ds = MaterialsProject(root=tmp_path / "c", structures=path, split=None, labels="source", progress=False)
    assert ds.ids == ["mp-10", "mp-10000"]
    reasons = {s.id + str(s.index): s.reason for s in ds.skipped}
    assert "partial occupancies" in reasons["x-partial1"] and "Na:0.5" in reasons["x-partial1"]
    assert "no unit cell" in reasons["x-nocell2"] and "_cell_length_a" in reasons["x-nocell2"]
    assert "overlap" in reasons["x-overlap3"] and reasons["x-overlap3"].startswith("bad.json x-overlap")
    assert "duplicate id" in reasons["mp-104"]
    assert "4 of 6 structures rejected" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="equiformer.datasets"):
        again = MaterialsProject(root=tmp_path / "c", structures=path, split=None, labels="source", progress=False)
    assert again.cache_hit and [s.reason for s in again.skipped] == [s.reason for s in ds.skipped]
    assert "4 of 6 structures rejected" in caplog.text  # reported on a cache hit too


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="mp.2018.6.1.json not found.*download_megnet_mp2018"):
        MaterialsProject(root=tmp_path, structures=tmp_path / "mp.2018.6.1.json")
    with pytest.raises(ValueError, match="unknown materials_project target 'homo'"):
        MPFormationEnergy(root=tmp_path, targets="homo", data_dir=DATA)
    with pytest.raises(ValueError, match="split must be 'megnet' or None"):
        MaterialsProject(root=tmp_path, split="random")
    bad = tmp_path / "bad.csv"
    bad.write_text("material_id,structure\n1,2\n")
    with pytest.raises(ValueError, match="holds '1', not an MP id"):
        read_mp_csv(bad)
    with pytest.raises(FileNotFoundError, match="MEGNet split file"):
        megnet_split("e_form", data_dir=tmp_path)
