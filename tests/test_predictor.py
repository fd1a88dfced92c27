"""Predictor (equiformer.api) and EquiformerCalculator (equiformer.calculator) on a tiny exported model.

The model's weights are random (tests/pretrained_helpers.py); what is checked is everything
around them: input conversion, batching, de-normalisation with the QM9 free-atom references,
applicability domain, output shapes, and the calculator's energy and forces.
"""

from __future__ import annotations

import importlib.util
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from pretrained_helpers import NORMALIZATION, make_tiny_model
from torch_geometric.data import Batch

from equiformer import Predictor, hub
from equiformer.api import ExtrapolationWarning, OutOfDomainError, OutOfDomainWarning
from equiformer.data import from_smiles

torch.set_num_threads(1)
HAS_QM9 = importlib.util.find_spec("qm9pack") is not None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    make_tiny_model(d, name="tiny-qm9", targets=("homo", "U0"))
    make_tiny_model(d, name="fam-homo", targets=("homo",), seed=1)
    make_tiny_model(d, name="fam-lumo", targets=("lumo",), seed=2)
    return d


@pytest.fixture(scope="module")
def predictor(model_dir) -> Predictor:
    return Predictor.from_pretrained(model_dir / "tiny-qm9.json", device="cpu")


def _manual(predictor: Predictor, datas) -> np.ndarray:
    """Reference de-normalisation, written independently: y*std + mean + sum of QM9 free-atom energies."""
    from equiformer.datasets.qm9 import qm9_atomref

    net = predictor.models[0].model
    batch = Batch.from_data_list([from_ase_like(d) for d in datas])
    with torch.no_grad():
        y = net(batch)["y"].double().numpy()
    homo = y[:, 0] * NORMALIZATION["homo"][1] + NORMALIZATION["homo"][0]
    ref = qm9_atomref("U0").numpy()
    u0 = y[:, 1] * NORMALIZATION["U0"][1] + NORMALIZATION["U0"][0]
    u0 = u0 + np.array([ref[d.z.numpy()].sum() for d in datas])
    return np.stack([homo, u0], axis=1)


def from_ase_like(d):
    from torch_geometric.data import Data

    return Data(z=d.z, pos=d.pos.float(), cell=d.cell.float(), pbc=d.pbc)


# --------------------------------------------------------------------------- inputs and outputs


def test_smiles_to_dataframe_with_units(predictor):
    smiles = ["CCO", "O", "c1ccccc1", "CC(=O)O"]
    df = predictor.predict(smiles)
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ["input", "formula", "homo (eV)", "U0 (eV)"] == predictor.columns
    assert df["input"].tolist() == smiles and df["formula"].tolist() == ["C2H6O", "H2O", "C6H6", "C2H4O2"]
    expected = _manual(predictor, [from_smiles(s) for s in smiles])
    np.testing.assert_allclose(df[["homo (eV)", "U0 (eV)"]].to_numpy(), expected, rtol=1e-9, atol=1e-6)
    # U0 is a total energy: the free-atom references dominate (ethanol ~ -4.2e3 eV)
    assert -4300 < df["U0 (eV)"][0] < -4100 and df.attrs["units"] == {"homo": "eV", "U0": "eV"}


def test_every_input_kind_gives_the_same_prediction_for_the_same_geometry(predictor, tmp_path):
    from ase.io import write
    from rdkit import Chem
    from rdkit.Chem import AllChem

    from equiformer.data import to_ase

    mol = Chem.AddHs(Chem.MolFromSmiles("CC(=O)N"))
    AllChem.EmbedMolecule(mol, randomSeed=7)
    AllChem.MMFFOptimizeMolecule(mol)
    data = from_rdkit_mol(mol)
    atoms = to_ase(data)
    write(tmp_path / "acetamide.xyz", atoms)
    writer = Chem.SDWriter(str(tmp_path / "two.sdf"))
    writer.write(mol)
    water = Chem.AddHs(Chem.MolFromSmiles("O"))
    AllChem.EmbedMolecule(water, randomSeed=1)
    writer.write(water)
    writer.close()
    from pymatgen.core import Molecule

    pmg = Molecule([int(z) for z in atoms.numbers], atoms.positions)
    inputs = [mol, atoms, data, str(tmp_path / "acetamide.xyz"), tmp_path / "two.sdf", pmg]
    df = predictor.predict(inputs)
    assert len(df) == 7  # the SDF holds two molecules: two rows
    assert df["input"][4] == f"{tmp_path / 'two.sdf'}[0]" and df["input"][5] == f"{tmp_path / 'two.sdf'}[1]"
    assert df["formula"].tolist() == ["C2H5NO"] * 5 + ["H2O", "C2H5NO"]
    vals = df[["homo (eV)", "U0 (eV)"]].to_numpy()
    same = vals[[0, 1, 2, 3, 4, 6]]
    np.testing.assert_allclose(same, np.broadcast_to(same[0], same.shape), rtol=0, atol=2e-4)
    assert np.isfinite(vals).all() and abs(vals[5, 1] - vals[0, 1]) > 100  # water is not acetamide


def from_rdkit_mol(mol):
    from equiformer.data import from_rdkit

    return from_rdkit(mol)


def test_rdkit_mol_without_geometry_is_embedded(predictor):
    from rdkit import Chem

    df = predictor.predict([Chem.MolFromSmiles("CCO"), "CCO"])
    assert df["input"].tolist() == ["CCO", "CCO"]
    np.testing.assert_allclose(df.iloc[0, 2:].to_numpy(float), df.iloc[1, 2:].to_numpy(float), atol=1e-9)


def test_single_input_as_dict(predictor):
    d = predictor.predict("CCO", as_dict=True)
    assert d["input"] == "CCO" and d["formula"] == "C2H6O"
    assert set(d) == {"input", "formula", "homo", "U0"}
    assert d["homo"]["unit"] == "eV" and isinstance(d["homo"]["value"], float)
    df = predictor.predict("CCO")
    assert math.isclose(d["U0"]["value"], df["U0 (eV)"][0], rel_tol=0, abs_tol=1e-9)
    many = predictor.predict(["O", "C"], as_dict=True)
    assert isinstance(many, list) and [r["formula"] for r in many] == ["H2O", "CH4"]


# --------------------------------------------------------------------------- batching


@pytest.fixture(scope="module")
def qm9_datas(tmp_path_factory):
    if not HAS_QM9:
        pytest.skip("qm9pack not installed")
    from equiformer.datasets import QM9

    ds = QM9(root=str(tmp_path_factory.mktemp("qm9")), subset=300, targets=["homo"], progress=False)
    return [ds[i] for i in range(0, 300, 2)]  # 150 real molecules, 1-9 heavy atoms


def test_batched_prediction_of_many_molecules_with_progress(predictor, qm9_datas, capsys):
    calls = []
    handle = predictor.models[0].model.register_forward_hook(lambda m, i, o: calls.append(int(i[0].num_graphs)))
    try:
        df = predictor.predict(qm9_datas, batch_size=32, progress=True)
    finally:
        handle.remove()
    assert len(df) == 150 and calls == [32, 32, 32, 32, 22]
    err = capsys.readouterr().err
    assert "predict" in err and "150/150" in err  # tqdm's bar on stderr
    one_by_one = np.concatenate([predictor.predict(qm9_datas[i:i + 1]).iloc[:, 2:].to_numpy(float) for i in range(0, 150, 37)])
    np.testing.assert_allclose(df.iloc[::37, 2:].to_numpy(float), one_by_one, rtol=0, atol=1e-3)
    np.testing.assert_allclose(df.iloc[:, 2:].to_numpy(float), _manual(predictor, qm9_datas), rtol=1e-9, atol=1e-6)
    assert df["input"][0] == qm9_datas[0].name == "gdb_1"  # a Data's name labels its row


# --------------------------------------------------------------------------- applicability domain and errors


def test_unknown_element_is_refused_by_default(predictor):
    with pytest.raises(OutOfDomainError, match=r"CCCl: contains Cl, an element model 'tiny-qm9' never saw") as err:
        predictor.predict(["CCO", "CCCl"])
    assert "QM9 has only H, C, N, O, F" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_unknown_element_with_warn_gives_a_nan_row(predictor):
    with pytest.warns(OutOfDomainWarning, match="Br"):
        df = predictor.predict(["CCO", "CBr", "O"], on_unknown="warn")
    assert df.iloc[1, 2:].isna().all() and np.isfinite(df.iloc[[0, 2], 2:].to_numpy(float)).all()
    assert "Br" in df.attrs["notes"][1][0]
    with pytest.warns(OutOfDomainWarning):
        d = predictor.predict(["CBr"], as_dict=True, on_unknown="warn")
    assert d[0]["homo"] == {"value": None, "unit": "eV"} and "Br" in d[0]["notes"][0]


def test_molecules_larger_than_qm9_warn_that_they_extrapolate(predictor):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExtrapolationWarning)
        predictor.predict(["CCCCCCCCC"])  # 9 heavy atoms, 29 atoms: inside QM9's range
    with pytest.warns(ExtrapolationWarning, match=r"CCCCCCCCCC: 32 atoms \(10 heavy\) is larger than any molecule in QM9"):
        df = predictor.predict(["CCCCCCCCCC", "O"])
    assert np.isfinite(df.iloc[:, 2:].to_numpy(float)).all() and 0 in df.attrs["notes"] and 1 not in df.attrs["notes"]


def test_periodic_structure_is_refused_by_a_molecular_model(predictor):
    from ase.build import bulk

    with pytest.raises(OutOfDomainError, match="is periodic, but model 'tiny-qm9' was trained on isolated molecules"):
        predictor.predict(bulk("C", "diamond", a=3.57))


def test_bad_inputs_give_clear_errors(predictor, tmp_path):
    with pytest.raises(ValueError, match="C1CC"):
        predictor.predict(["CCO", "C1CC"])  # unclosed ring
    with pytest.raises(ValueError, match="not_a_molecule"):
        predictor.predict("not_a_molecule")
    with pytest.raises(FileNotFoundError, match="missing.xyz"):
        predictor.predict(str(tmp_path / "missing.xyz"))
    bad = tmp_path / "bad.xyz"
    bad.write_text("3\n\nO 0 0 0\nH 0 0\n")
    with pytest.raises(ValueError, match="bad.xyz"):
        predictor.predict(str(bad))
    with pytest.raises(TypeError, match="cannot predict for a builtins.int"):
        predictor.predict([42])
    with pytest.raises(ValueError, match="on_unknown"):
        predictor.predict("O", on_unknown="ignore")


# --------------------------------------------------------------------------- several models


def test_several_models_merge_into_one_table(model_dir, monkeypatch):
    monkeypatch.setenv(hub.ENV_DIRS, str(model_dir))
    p = Predictor.from_pretrained("fam", device="cpu")  # the family fam-homo + fam-lumo
    assert [m.name for m in p.models] == ["fam-homo", "fam-lumo"]
    df = p.predict(["CCO", "O"])
    assert list(df.columns) == ["input", "formula", "homo (eV)", "lumo (eV)"]
    single = Predictor.from_pretrained("fam-lumo", device="cpu").predict(["CCO", "O"])
    np.testing.assert_allclose(df["lumo (eV)"], single["lumo (eV)"], atol=1e-9)
    with pytest.raises(ValueError, match="'homo' is predicted by both"):
        Predictor.from_pretrained(["tiny-qm9", "fam-homo"], device="cpu")


def test_default_device_and_repr(predictor):
    from equiformer.api import _default_device

    assert predictor.device.type == "cpu" and predictor.models[0].device.type == "cpu"
    assert _default_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            _default_device("cuda")
    assert "tiny-qm9" in repr(predictor)


@pytest.mark.gpu
def test_prediction_on_gpu_matches_cpu(model_dir, predictor):
    gpu = Predictor.from_pretrained(model_dir / "tiny-qm9.json")  # device=None picks CUDA
    assert gpu.device.type == "cuda"
    smiles = ["CCO", "O", "c1ccccc1"]
    np.testing.assert_allclose(gpu.predict(smiles).iloc[:, 2:].to_numpy(float),
                               predictor.predict(smiles).iloc[:, 2:].to_numpy(float), rtol=1e-5, atol=2e-3)


# --------------------------------------------------------------------------- ASE calculator


def test_calculator_energy_is_the_u0_prediction_and_forces_its_gradient(model_dir, predictor):
    from ase.build import molecule

    from equiformer.calculator import EquiformerCalculator

    atoms = molecule("CH3OH")
    atoms.rattle(0.05, seed=3)
    calc = EquiformerCalculator(model_dir / "tiny-qm9.json", device="cpu", dtype=torch.float64)
    assert calc.target_name == "U0"
    atoms.calc = calc
    e = atoms.get_potential_energy()
    expected = predictor.predict(atoms.copy())["U0 (eV)"][0]
    assert abs(e - expected) < 2e-3  # float64 calculator vs float32 predictor
    f = atoms.get_forces()
    assert f.shape == (6, 3) and np.abs(f).max() > 0
    # forces = -dE/dx by central differences
    h = 1e-4
    for i, k in [(0, 0), (2, 1), (5, 2)]:
        a = atoms.copy()
        a.calc = calc
        a.positions[i, k] += h
        ep = a.get_potential_energy()
        a.positions[i, k] -= 2 * h
        em = a.get_potential_energy()
        assert abs(-(ep - em) / (2 * h) - f[i, k]) < 1e-5 * max(1.0, abs(f[i, k]))
    np.testing.assert_allclose(f.sum(axis=0), 0.0, atol=1e-8)  # translation invariance: no net force


def test_calculator_refuses_structures_and_models_it_cannot_handle(model_dir):
    from ase import Atoms

    from equiformer.calculator import EquiformerCalculator

    calc = EquiformerCalculator(Predictor.from_pretrained(model_dir / "tiny-qm9.json", device="cpu"))
    hcl = Atoms("HCl", positions=[[0, 0, 0], [0, 0, 1.27]])
    hcl.calc = calc
    with pytest.raises(OutOfDomainError, match="Cl"):
        hcl.get_potential_energy()
    with pytest.raises(ValueError, match="no loaded model predicts an energy"):
        EquiformerCalculator(model_dir / "fam-homo.json", device="cpu")
    with pytest.raises(ValueError, match="not an energy"):
        _dipole_calc(model_dir)


def _dipole_calc(model_dir):
    """A calculator asked to use a non-energy target (mu, in Debye) must refuse."""
    import json

    from equiformer.calculator import EquiformerCalculator

    meta = json.loads((model_dir / "fam-homo.json").read_text())
    meta["targets"][0].update(name="mu", unit="D")
    model, _ = hub.load_pretrained(model_dir / "fam-homo.json")
    return EquiformerCalculator((model, meta), target="mu", device="cpu")


def test_molecules_of_a_size_with_large_measured_errors_get_a_note(tmp_path):
    """The size breakdown written by leaderboards/qm9/error_by_size.py turns into a per-molecule note."""
    bins = [
        {"heavy_atoms": "1-3", "min": 1, "max": 3, "count": 12,
         "mae": {"homo": {"value": 120.0, "unit": "meV"}, "U0": {"value": 9000.0, "unit": "meV"}}},
        {"heavy_atoms": "4-9", "min": 4, "max": 9, "count": 10819,
         "mae": {"homo": {"value": 99.0, "unit": "meV"}, "U0": {"value": 480.0, "unit": "meV"}}},
    ]
    metrics = {"test_mae": {"homo": {"value": 100.0, "unit": "meV"}, "U0": {"value": 0.5, "unit": "eV"}},
               "test_mae_by_heavy_atoms": bins}
    make_tiny_model(tmp_path, name="sized", targets=("homo", "U0"), metrics=metrics)
    p = Predictor.from_pretrained(tmp_path / "sized.json", device="cpu")
    df = p.predict(["C", "CCCCC"])
    notes = df.attrs["notes"]
    assert 1 not in notes  # 5 heavy atoms: errors as usual
    (note,) = notes[0]
    # U0 in eV overall (0.5 eV = 500 meV) compared in meV; homo 120 < 2 x 100 is not flagged
    assert "1-3 heavy atoms" in note and "12 such QM9 test molecules" in note
    assert "U0 9000 meV (all test molecules: 500 meV)" in note and "homo" not in note


def test_shipped_qm9_model_records_its_error_by_molecule_size():
    meta = hub.read_metadata(hub.resolve("qm9-equiformer")[0])
    bins = meta["metrics"]["test_mae_by_heavy_atoms"]
    assert sum(b["count"] for b in bins) == meta["split"]["test"]
    assert [(b["min"], b["max"]) for b in bins] == sorted((b["min"], b["max"]) for b in bins)
    assert {t["name"] for t in meta["targets"]} == set(bins[0]["mae"])
