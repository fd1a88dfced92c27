"""`equiformer predict`: table / JSON / CSV output, files and SMILES, errors as one line + exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from pretrained_helpers import make_tiny_model

from equiformer import Predictor, hub
from equiformer.cli import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    make_tiny_model(d, name="tiny-qm9", targets=("homo", "U0"),
                    metrics={"test_mae": {"homo": 0.0151, "U0": {"value": 0.0066, "unit": "eV"}}})
    return d


@pytest.fixture(autouse=True)
def registry(model_dir, monkeypatch):
    monkeypatch.setenv(hub.ENV_DIRS, str(model_dir))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """water.xyz (one molecule) and three.sdf (three molecules), written with ASE and RDKit."""
    from ase.build import molecule
    from ase.io import write
    from rdkit import Chem
    from rdkit.Chem import AllChem

    from ase.build import bulk

    d = tmp_path_factory.mktemp("inputs")
    write(d / "water.xyz", molecule("H2O"))
    write(d / "diamond.cif", bulk("C", "diamond", a=3.567))
    w = Chem.SDWriter(str(d / "three.sdf"))
    for i, s in enumerate(["C", "CC#N", "OCC=O"]):
        m = Chem.AddHs(Chem.MolFromSmiles(s))
        AllChem.EmbedMolecule(m, randomSeed=i)
        m.SetProp("_Name", f"mol{i}")
        w.write(m)
    w.close()
    return d


@pytest.fixture(scope="module")
def predictor(model_dir) -> Predictor:
    return Predictor.from_pretrained(model_dir / "tiny-qm9.json", device="cpu")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["predict", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output(capsys, files, predictor):
    code, out, err = run(capsys, "CCO", str(files / "water.xyz"), "--model", "tiny-qm9", "--format", "json", "--device", "cpu")
    assert code == 0 and err == ""
    records = json.loads(out)
    assert [r["input"] for r in records] == ["CCO", str(files / "water.xyz")]
    assert [r["formula"] for r in records] == ["C2H6O", "H2O"]
    for r in records:
        assert r["homo"]["unit"] == "eV" and r["U0"]["unit"] == "eV"
        assert isinstance(r["homo"]["value"], float) and np.isfinite(r["U0"]["value"])
    expected = predictor.predict(["CCO", str(files / "water.xyz")])
    assert np.allclose([r["U0"]["value"] for r in records], expected["U0 (eV)"], atol=1e-9)


def test_csv_output_many_molecules_from_sdf_to_file(capsys, files, predictor, tmp_path):
    out_file = tmp_path / "props.csv"
    code, out, err = run(capsys, str(files / "three.sdf"), "O", "-m", "tiny-qm9", "-f", "csv", "-o", str(out_file))
    assert code == 0 and out == ""
    df = pd.read_csv(out_file)
    assert list(df.columns) == ["input", "formula", "homo (eV)", "U0 (eV)"]
    assert df["formula"].tolist() == ["CH4", "C2H3N", "C2H4O2", "H2O"]
    assert df["input"][1] == f"{files / 'three.sdf'}[1]"
    expected = predictor.predict([files / "three.sdf", "O"])
    np.testing.assert_allclose(df[["homo (eV)", "U0 (eV)"]].to_numpy(), expected.iloc[:, 2:].to_numpy(float), rtol=1e-12)


def test_table_names_model_training_set_and_test_mae(capsys, predictor):
    code, out, err = run(capsys, "CCO", "O", "-m", "tiny-qm9")
    assert code == 0
    assert "model: tiny-qm9" in out and "trained on: QM9 (split: train 110000, val 10000, test 10831" in out
    assert "15.1 meV" in out and "6.6 meV" in out  # test MAE in the report unit
    lines = out.splitlines()
    homo = next(line for line in lines if line.startswith("homo ") and "eV" in line and "meV" not in line)
    value = predictor.predict("CCO")["homo (eV)"][0]
    assert f"{value:.4f}" in homo
    assert any(line.startswith("formula") and "C2H6O" in line and "H2O" in line for line in lines)


def test_table_with_many_inputs_has_one_row_per_input(capsys):
    smiles = ["C", "CC", "CCC", "CO", "CN", "CF", "N", "O"]
    code, out, _ = run(capsys, *smiles, "-m", "tiny-qm9", "--batch-size", "3")
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("input"))
    assert "homo (eV)" in header and "U0 (eV)" in header
    rows = [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in smiles]
    assert rows == smiles


@pytest.mark.parametrize(
    "argv, message",
    [
        (["CCCl"], "CCCl: contains Cl, an element model 'tiny-qm9' never saw in training"),
        (["C1CC"], "C1CC"),
        (["missing.xyz"], "missing.xyz: no such file"),
        ([], "give at least one INPUT"),
        (["O", "--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(capsys, argv, message):
    model = [] if argv == [] else ["-m", "tiny-qm9"]
    code, out, err = run(capsys, *argv, *model)
    assert code == 2 and out == ""
    assert err.startswith("equiformer predict: error: ") and message in err
    assert err.count("\n") == 1  # one line, no traceback


def test_crystal_is_refused_by_a_molecular_model(capsys, files):
    code, out, err = run(capsys, str(files / "diamond.cif"), "-m", "tiny-qm9")
    assert code == 2 and out == ""
    assert "diamond.cif: is periodic, but model 'tiny-qm9' was trained on isolated molecules (QM9)" in err


def test_unknown_model_is_an_error_listing_the_available_ones(capsys):
    code, _, err = run(capsys, "O", "--model", "qm9-nope")
    assert code == 2 and "no pretrained model named 'qm9-nope'; available: " in err
    assert "tiny-qm9" in err.split("available: ")[1]


def test_on_unknown_warn_gives_nan_and_a_warning(capsys):
    code, out, err = run(capsys, "CCCl", "CCO", "-m", "tiny-qm9", "-f", "json", "--on-unknown", "warn")
    assert code == 0 and "equiformer predict: warning: CCCl: contains Cl" in err
    records = json.loads(out)
    assert records[0]["homo"]["value"] is None and records[1]["homo"]["value"] is not None


def test_large_molecule_warns_that_it_extrapolates(capsys):
    code, out, err = run(capsys, "CCCCCCCCCCCC", "-m", "tiny-qm9")
    assert code == 0 and "warning:" in err and "extrapolates" in err
    assert "notes:" in out and "extrapolates" in out


def test_list_models(capsys, model_dir, monkeypatch):
    code, out, _ = run(capsys, "--list-models")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("tiny-qm9"))
    assert "QM9" in line and "homo (15.1 meV)" in line and "U0 (6.6 meV)" in line
    monkeypatch.setenv(hub.ENV_DIRS, str(model_dir / "empty"))
    monkeypatch.setattr(hub, "PACKAGE_DIR", model_dir / "empty")
    code, out, _ = run(capsys, "--list-models")
    assert code == 0 and out.startswith("no pretrained models installed")


def test_console_script_runs_in_seconds_for_one_molecule(model_dir):
    """The installed entry point, in a fresh interpreter: one SMILES to JSON on CPU."""
    env = {**os.environ, hub.ENV_DIRS: str(model_dir), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "equiformer.cli", "predict", "CCO", "-m", "tiny-qm9", "-f", "json",
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["input"] == "CCO"
    assert elapsed < 60, f"equiformer predict took {elapsed:.1f} s"


def test_command_defaults_mirror_the_api_defaults():
    """commands/predict.py repeats the default model names (importing equiformer.api would slow start-up)."""
    from equiformer import api
    from equiformer.commands import predict

    assert predict.DEFAULT_MODEL == api.DEFAULT_MODEL
    assert tuple(predict.DEFAULT_CRYSTAL_MODELS) == tuple(api.DEFAULT_CRYSTAL_MODELS)
