"""QM9 adapter: values and units against qm9pack's CSV rows (read here independently with
pandas), published values of methane and water, PyG's constants and atomrefs, splits, cache."""

from __future__ import annotations

import ast
import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pd = pytest.importorskip("pandas")
if importlib.util.find_spec("qm9pack") is None:
    pytest.skip('qm9pack not installed (pip install "equiformer[qm9]")', allow_module_level=True)

from torch_geometric.datasets import qm9 as pyg_qm9  # noqa: E402  (PyG's constants, independent of ours)

import equiformer.datasets.qm9 as qm9_module  # noqa: E402
from equiformer.data.contract import StructureError, make_data  # noqa: E402
from equiformer.datasets import (  # noqa: E402
    QM9,
    QM9_TARGET_NAMES,
    qm9_atomref,
    qm9_split,
    qm9_target_info,
    random_split_indices,
    resolve_qm9_targets,
)

SRC = Path(importlib.util.find_spec("qm9pack").submodule_search_locations[0]) / "data"
N_SUBSET = 1000
# qm9pack column of each of the 12 standard targets and whether it is in Hartree
RAW = [("Dipole_debye", False), ("Polarizability_bohr3", False), ("HOMO_au", True), ("LUMO_au", True),
       ("HOMO_LUMO_gap_au", True), ("R2_bohr2", False), ("ZPVE_au", True), ("InternalEnergy_0K_au", True),
       ("InternalEnergy_298K_au", True), ("Enthalphy_298K_au", True), ("GibbsFreeEnergy_298K_au", True),
       ("Heatcapacity_Cv_cal_mol_K", False)]
SYMBOL_Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qm9cache")


@pytest.fixture(scope="module")
def ds(cache_dir) -> QM9:
    return QM9(root=cache_dir, subset=N_SUBSET, dtype=torch.float64, progress=False)


@pytest.fixture(scope="module")
def raw() -> pd.DataFrame:
    return pd.read_csv(SRC / "qm9_part1.csv", nrows=N_SUBSET)


def _expected(row) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = np.array([SYMBOL_Z[s] for s in ast.literal_eval(row["Elements"])])
    pos = np.array(ast.literal_eval(row["XYZ_Ang"]), dtype=np.float64)
    y = np.array([row[c] * (pyg_qm9.HAR2EV if hartree else 1.0) for c, hartree in RAW])
    return z, pos, y


# ------------------------------------------------------------------ values and units


def test_rows_match_csv(ds, raw):
    assert len(ds) == N_SUBSET
    for i in [0, 1, 2, 3, 57, 58, 123, 500, 998, 999]:
        z, pos, y = _expected(raw.iloc[i])
        d = ds[i]
        assert d.z.tolist() == z.tolist()
        assert torch.equal(d.pos, torch.from_numpy(pos))
        np.testing.assert_allclose(d.y.numpy()[0], y, rtol=1e-12, atol=1e-12)
        assert d.name == f"gdb_{raw['Index'].iat[i]}"
        assert d.smiles == raw["SMILES"].iat[i]
        assert int(d.idx) == i


def test_target_order_and_conversion_match_pyg():
    assert qm9_module.HARTREE_TO_EV == pyg_qm9.HAR2EV
    # PyG's y columns 0..11 are ours; its conversion vector says which are Hartree -> eV
    for k, (name, (_, hartree)) in enumerate(zip(QM9_TARGET_NAMES, RAW)):
        assert float(pyg_qm9.conversion[k]) == pytest.approx(pyg_qm9.HAR2EV if hartree else 1.0, rel=1e-7), name
        if hartree:
            assert qm9_target_info(name).unit == "eV" and qm9_target_info(name).report_unit == "meV", name
    assert list(QM9_TARGET_NAMES) == ["mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "Cv"]


def test_methane_and_water_published_values(ds):
    # QM9 (Ramakrishnan et al. 2014), dsgdb9nsd_000001.xyz = methane, dsgdb9nsd_000003.xyz = water
    ha = 27.211386246
    methane = ds[0]
    assert methane.name == "gdb_1" and methane.smiles == "C"
    assert sorted(methane.z.tolist()) == [1, 1, 1, 1, 6]
    y = dict(zip(QM9_TARGET_NAMES, methane.y[0].tolist()))
    assert y["mu"] == 0.0
    assert y["alpha"] == pytest.approx(13.21)
    assert y["homo"] == pytest.approx(-0.3877 * ha)
    assert y["lumo"] == pytest.approx(0.1171 * ha)
    assert y["gap"] == pytest.approx(0.5048 * ha)
    assert y["r2"] == pytest.approx(35.3641)
    assert y["zpve"] == pytest.approx(0.044749 * ha)
    assert y["U0"] == pytest.approx(-40.47893 * ha)
    assert y["Cv"] == pytest.approx(6.469)
    # C-H bond length of methane ~1.09 Å: positions are in Å, not bohr
    c = methane.pos[methane.z == 6][0]
    bonds = (methane.pos[methane.z == 1] - c).norm(dim=1)
    assert torch.allclose(bonds, torch.full((4,), 1.092, dtype=torch.float64), atol=0.005)
    water = ds[2]
    assert water.name == "gdb_3" and water.z.tolist() == [8, 1, 1]
    assert float(water.y[0, 7]) == pytest.approx(-76.404702 * ha)
    oh = (water.pos[1:] - water.pos[0]).norm(dim=1)
    assert torch.allclose(oh, torch.full((2,), 0.962, dtype=torch.float64), atol=0.005)


def test_alpha_is_trace_of_polarizability_tensor(ds):
    tensor = pd.read_csv(SRC / "qm9_polarizability.csv", nrows=N_SUBSET)
    trace = ((tensor["A_xx"] + tensor["A_yy"] + tensor["A_zz"]) / 3).to_numpy()
    alpha = ds.y_table[:, QM9_TARGET_NAMES.index("alpha")].numpy()
    assert np.abs(alpha - trace).max() <= 0.0051  # both rounded to 2-3 decimals in bohr^3


def test_item_equals_make_data(ds):
    for i in [0, 7, 444]:
        d = ds[i]
        ref = make_data(d.z.numpy(), d.pos.numpy(), y=d.y.numpy(), dtype=torch.float64)
        for key in ("z", "pos", "cell", "pbc", "y"):
            assert getattr(d, key).dtype == getattr(ref, key).dtype, key
            assert torch.equal(getattr(d, key), getattr(ref, key)), key
        assert d.cell.shape == (1, 3, 3) and d.pbc.shape == (1, 3) and not d.pbc.any()
        # items own their memory (a saved item must not carry the whole dataset's table)
        assert d.pos.untyped_storage().nbytes() == d.pos.numel() * d.pos.element_size()


def test_default_dtype_and_target_selection(cache_dir):
    d = QM9(root=cache_dir, subset=N_SUBSET, targets=["HOMO", "u0", "Cv"], progress=False)
    assert d.target_names == ["homo", "U0", "Cv"]
    item = d[-1]
    assert item.pos.dtype == torch.get_default_dtype() and item.y.shape == (1, 3)
    full = QM9(root=cache_dir, subset=N_SUBSET, dtype=torch.float64, progress=False)
    assert torch.allclose(item.y.double(), full[N_SUBSET - 1].y[:, [2, 7, 11]].to(item.y.dtype).double())
    with pytest.raises(IndexError):
        d[N_SUBSET]


# ------------------------------------------------------------------ targets and atomrefs


def test_target_aliases():
    assert qm9_target_info("HOMO").name == "homo"
    assert qm9_target_info("u0").name == "U0" and qm9_target_info("u").name == "U"
    assert qm9_target_info("Gap").report_unit == "meV" and qm9_target_info("gap").report_scale == 1000.0
    assert qm9_target_info("cv").unit == "cal/(mol K)" and qm9_target_info("dipole").name == "mu"
    assert qm9_target_info(7).name == "U0"
    assert resolve_qm9_targets("homo,lumo") == ["homo", "lumo"]
    assert QM9.TARGETS[0].unit == "D"
    with pytest.raises(ValueError, match="unknown QM9 target 'enthalpyy'.*mu, alpha"):
        qm9_target_info("enthalpyy")
    with pytest.raises(ValueError, match="twice"):
        resolve_qm9_targets(["u0", "U0"])


def test_atomrefs_match_pyg():
    for pyg_target, name in [(7, "U0"), (8, "U"), (9, "H"), (10, "G")]:
        ours = QM9.atomref(name)
        assert ours.shape == (119,) and ours.dtype == torch.float64
        # PyG converted its table with CODATA 2014's 27.21138602 eV/Ha (ours: 2018's, as its y): 1e-8 apart
        np.testing.assert_allclose(ours[[1, 6, 7, 8, 9]].numpy(), pyg_qm9.atomrefs[pyg_target], rtol=2e-8, atol=0)
        assert ours[[0, 2, 3, 4, 5, 10, 118]].abs().sum() == 0
    for name in ["mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "Cv"]:
        assert qm9_atomref(name) is None
    for pyg_target in (6, 11):  # PyG: zero references for ZPVE and Cv, i.e. none
        assert not any(pyg_qm9.atomrefs[pyg_target])


def test_methane_atomization_energy(ds, cache_dir):
    ref = ds.atomref_sums(["U0"])[0, 0]
    e_at = float(ds.y_table[0, 7] - ref)
    assert e_at == pytest.approx((-40.47893 - (-37.846772 + 4 * -0.500273)) * 27.211386246, abs=1e-9)
    assert e_at == pytest.approx(-17.172, abs=1e-3)
    sub = QM9(root=cache_dir, subset=N_SUBSET, targets=["U0", "homo"], subtract_atomref=True, progress=False)
    assert float(sub[0].y[0, 0]) == pytest.approx(e_at, abs=1e-5)  # float32 of a small number
    assert float(sub[0].y[0, 1]) == pytest.approx(float(ds.y_table[0, 2]), rel=1e-6)  # no atomref for homo
    # atomization energies of QM9 molecules are negative and scale with size
    e = (ds.y_table[:, 7] - ds.atomref_sums(["U0"])[:, 0]).numpy()
    assert (e < 0).all() and np.corrcoef(e, ds.num_atoms.numpy())[0, 1] < -0.8


# ------------------------------------------------------------------ splits


def test_standard_split_sizes_without_processing():
    split = qm9_split()
    assert {k: len(v) for k, v in split.items()} == {"train": 110_000, "val": 10_000, "test": 10_831}
    allidx = torch.cat(list(split.values()))
    assert torch.equal(allidx.sort().values, torch.arange(130_831))
    # the Equiformer repository's protocol (datasets/pyg/qm9.py, torchmd_net_split=True)
    perm = np.random.default_rng(1).permutation(130_831)
    train, val, test = np.split(perm, [110_000, 120_000])
    assert np.array_equal(split["train"].numpy(), train) and np.array_equal(split["test"].numpy(), test)
    assert np.array_equal(split["val"].numpy(), val)
    again = qm9_split()
    assert all(torch.equal(split[k], again[k]) for k in split)
    assert not torch.equal(qm9_split(seed=2)["train"], split["train"])


def test_random_split_indices_rules():
    s = random_split_indices(10, {"a": 3, "b": 0.5, "c": None}, seed=0)
    assert [len(v) for v in s.values()] == [3, 5, 2]
    s = random_split_indices(10, [4, 4], seed=0)
    assert set(s) == {"train", "val"} and len(set(torch.cat(list(s.values())).tolist())) == 8
    with pytest.raises(ValueError, match="more than the 10"):
        random_split_indices(10, {"train": 8, "val": 3})
    with pytest.raises(ValueError, match="only one split"):
        random_split_indices(10, {"train": None, "val": None})
    with pytest.raises(ValueError, match="fraction"):
        random_split_indices(10, {"train": 1.5})


def test_subset_split_scales(ds):
    assert {k: len(v) for k, v in ds.split().items()} == {"train": 840, "val": 76, "test": 84}


# ------------------------------------------------------------------ cache


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    first = QM9(root=tmp_path, subset=300, progress=False)
    assert not first.cache_hit and first.cache_path.is_file()
    t0 = time.perf_counter()
    second = QM9(root=tmp_path, subset=300, progress=False)
    assert second.cache_hit and time.perf_counter() - t0 < 3.0
    assert second.cache_path == first.cache_path
    for i in (0, 150, 299):
        a, b = first[i], second[i]
        assert torch.equal(a.pos, b.pos) and torch.equal(a.y, b.y) and a.smiles == b.smiles
    # a new code version makes a new key: reprocessed, the stale file removed
    monkeypatch.setattr(qm9_module, "QM9_CACHE_VERSION", qm9_module.QM9_CACHE_VERSION + 1)
    third = QM9(root=tmp_path, subset=300, progress=False)
    assert not third.cache_hit and third.cache_path != first.cache_path
    assert not first.cache_path.exists() and third.cache_path.is_file()
    # a different subset is a different cache file
    assert QM9(root=tmp_path, subset=200, progress=False).cache_path != third.cache_path
    assert QM9(root=tmp_path, subset=300, progress=False, force_reload=True).cache_hit is False


def test_cache_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("EQUIFORMER_CACHE", str(tmp_path / "envcache"))
    d = QM9(subset=20, progress=False)
    assert d.cache_path.parent == tmp_path / "envcache" / "qm9"


# ------------------------------------------------------------------ small real source folders


def _head(path: Path, n: int) -> str:
    with open(path) as f:
        return "".join(next(f) for _ in range(n + 1))


@pytest.fixture()
def small_source(tmp_path) -> Path:
    """The first rows of each qm9pack part (real rows, three files)."""
    src = tmp_path / "src"
    src.mkdir()
    for name, n in [("qm9_part1.csv", 30), ("qm9_part2.csv", 5), ("qm9_part3.csv", 5)]:
        (src / name).write_text(_head(SRC / name, n))
    return src


def test_rows_of_all_three_parts(small_source, tmp_path):
    d = QM9(root=tmp_path / "c", source_dir=small_source, dtype=torch.float64, progress=False)
    assert len(d) == 40
    for name, rows in [("qm9_part1.csv", range(0, 30)), ("qm9_part2.csv", range(30, 35)), ("qm9_part3.csv", range(35, 40))]:
        table = pd.read_csv(small_source / name)
        for k, i in enumerate(rows):
            z, pos, y = _expected(table.iloc[k])
            item = d[i]
            assert item.z.tolist() == z.tolist() and torch.equal(item.pos, torch.from_numpy(pos))
            np.testing.assert_allclose(item.y.numpy()[0], y, rtol=1e-12)
            assert item.name == f"gdb_{table['Index'].iat[k]}"
    # touching a source file (new mtime) invalidates the cache
    assert QM9(root=tmp_path / "c", source_dir=small_source, progress=False).cache_hit
    p = small_source / "qm9_part3.csv"
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    assert not QM9(root=tmp_path / "c", source_dir=small_source, progress=False).cache_hit


def _corrupt(src: Path, row: int, column: str, value: str) -> None:
    table = pd.read_csv(src / "qm9_part1.csv")
    table[column] = table[column].astype(object)
    table.loc[row, column] = value
    table.to_csv(src / "qm9_part1.csv", index=False)


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("XYZ_Ang", "[[-0.03,0.97,0.007],[0.06,0.02,0.001]]", "N_atoms=3 but 3 elements and 6 coordinates"),
        ("Elements", "['O','Xq','H']", "unknown element 'Xq'"),
        ("XYZ_Ang", "[[0.0,0.0,0.0],[0.0,0.0,0.05],[0.8,1.3,0.0]]", "closer than 0.1"),
        ("XYZ_Ang", "[[0.0,0.0,0.0],[0.0,nan,0.05],[0.8,1.3,0.0]]", "non-finite"),
        ("XYZ_Ang", "[[0.0,0.0,0.0],[0.0,abc,0.05],[0.8,1.3,0.0]]", "unreadable coordinates"),
    ],
)
def test_bad_rows_are_named(small_source, tmp_path, column, value, message):
    _corrupt(small_source, 2, column, value)  # water, dsgdb9nsd_000003.xyz
    with pytest.raises(StructureError, match=message) as info:
        QM9(root=tmp_path / "c", source_dir=small_source, progress=False)
    assert "qm9_part1.csv row 4 (dsgdb9nsd_000003.xyz)" in str(info.value)


def test_missing_source_gives_install_hint(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="qm9_part1.csv"):
        QM9(root=tmp_path, source_dir=tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "qm9pack" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r'pip install "equiformer\[qm9\]"'):
        QM9(root=tmp_path)


# ------------------------------------------------------------------ the whole dataset


@pytest.mark.slow
def test_full_dataset(tmp_path):
    t0 = time.perf_counter()
    d = QM9(root=tmp_path, dtype=torch.float64, progress=False)
    t_process = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = QM9(root=tmp_path, dtype=torch.float64, progress=False)
    t_load = time.perf_counter() - t0
    size_mb = d.cache_path.stat().st_size / 1e6
    print(f"\nQM9 full: processed in {t_process:.1f} s, reloaded in {t_load:.2f} s, cache {size_mb:.1f} MB")
    assert again.cache_hit and t_load < 3.0 and t_process < 180
    assert len(d) == 130_831
    gdb = d.gdb_index.numpy()
    assert gdb[0] == 1 and gdb[-1] == 133_885 and (np.diff(gdb) > 0).all()  # GDB-9 order, 3,054 absent
    counts = [0]
    for name in qm9_module.QM9_SOURCE_FILES:
        table = pd.read_csv(SRC / name, usecols=["N_atoms"])
        counts.append(counts[-1] + len(table))
        assert int(d.num_atoms[counts[-2]:counts[-1]].sum()) == int(table["N_atoms"].sum())
    rng = np.random.default_rng(0)
    for k, name in enumerate(qm9_module.QM9_SOURCE_FILES):
        table = pd.read_csv(SRC / name)
        for r in [0, len(table) - 1, *rng.integers(0, len(table), 5).tolist()]:
            z, pos, y = _expected(table.iloc[r])
            item = d[counts[k] + r]
            assert item.z.tolist() == z.tolist() and torch.equal(item.pos, torch.from_numpy(pos))
            np.testing.assert_allclose(item.y.numpy()[0], y, rtol=1e-12)
    assert set(d.z.unique().tolist()) == {1, 6, 7, 8, 9} and int(d.num_atoms.max()) == 29


def test_compact_export_loads_without_the_source(tmp_path):
    """A float32-position export in ``root`` stands in for qm9pack (e.g. on a GPU node)."""
    from equiformer.datasets.qm9 import export_compact_qm9

    full = QM9(root=tmp_path / "cache", subset=50, progress=False)
    export_compact_qm9(full, tmp_path / "node" / "qm9_first50_copied.safetensors")
    moved = QM9(root=tmp_path / "node", subset=50, source_dir=tmp_path / "missing", progress=False)
    assert moved.cache_hit and moved.source_dir is None and len(moved) == 50
    for i in (0, 17, 49):
        a, b = full[i], moved[i]
        assert torch.equal(a.z, b.z) and torch.equal(a.y, b.y)
        assert torch.allclose(a.pos, b.pos, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="qm9pack"):
        QM9(root=tmp_path / "empty", subset=50, source_dir=tmp_path / "missing", progress=False)
