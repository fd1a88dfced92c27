"""Crystal predictions with the shipped Materials Project models (`mp-eform`, `mp-gap`).

`equiformer predict NaCl.cif` picks the crystal models for periodic inputs by itself; CIF,
POSCAR, extxyz and pymatgen JSON of one structure give one answer; `Predictor` takes pymatgen
Structures and ASE Atoms; bad crystals (partial occupancies, no cell) give one-line errors that
name the file; the shipped models' recorded test MAE is what they score on the test split.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from equiformer import hub
from equiformer.api import DEFAULT_CRYSTAL_MODELS, Predictor
from equiformer.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

SHARED = Path(os.environ.get("EQUIFORMER_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def nacl():
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def silicon():
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.43), ["Si"], [[0, 0, 0]])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """NaCl as CIF, POSCAR, extxyz and pymatgen JSON; Si as CIF; a disordered CIF; a CIF without a cell."""
    from ase.io import write
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.cif import CifWriter

    d = tmp_path_factory.mktemp("crystals")
    s = nacl()
    CifWriter(s).write_file(d / "NaCl.cif")
    s.to(filename=str(d / "POSCAR"))
    write(d / "NaCl.extxyz", AseAtomsAdaptor.get_atoms(s))
    (d / "NaCl.json").write_text(json.dumps(s.as_dict()))
    CifWriter(silicon()).write_file(d / "Si.cif")
    CifWriter(Structure(Lattice.cubic(3.0), [{"Cu": 0.5, "Au": 0.5}], [[0, 0, 0]])).write_file(d / "CuAu_disordered.cif")
    (d / "nocell.cif").write_text(
        "data_nocell\n_symmetry_space_group_name_H-M 'P 1'\nloop_\n _atom_site_label\n _atom_site_type_symbol\n"
        " _atom_site_fract_x\n _atom_site_fract_y\n _atom_site_fract_z\n  Na1 Na 0.0 0.0 0.0\n  Cl1 Cl 0.5 0.5 0.5\n")
    write(d / "water.xyz", __import__("ase.build", fromlist=["molecule"]).molecule("H2O"))
    return d


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_pretrained(DEFAULT_CRYSTAL_MODELS, device="cpu")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["predict", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_shipped_crystal_models_describe_themselves():
    for name, target, unit in (("mp-eform", "e_form", "eV/atom"), ("mp-gap", "gap", "eV")):
        _, meta = hub.load_pretrained(name)
        assert [t["name"] for t in meta["targets"]] == [target]
        assert meta["targets"][0]["unit"] == unit
        assert meta["domain"]["periodic"] is True
        assert hub.test_mae(meta)[target]["unit"] == unit
        assert meta["split"]["train"] == 3418 and meta["split"]["test"] == 226
        assert {11, 17, 14} <= set(meta["elements"])


def test_cli_picks_crystal_models_for_a_cif(capsys, files):
    code, out, err = run(capsys, str(files / "NaCl.cif"))
    assert code == 0, err
    assert "model: mp-eform" in out and "model: mp-gap" in out and "qm9" not in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert lines["e_form"][1] == "eV/atom" and lines["gap"][1] == "eV"
    # the header's rows give the test MAE with its unit (report unit: meV/atom, meV)
    header_rows = [line for line in out.splitlines() if line.startswith(("e_form ", "gap "))]
    assert any("meV/atom" in r for r in header_rows) and any("meV" in r for r in header_rows)
    e_form = float(lines["e_form"][-1])
    gap = float(lines["gap"][-1])
    assert "NaCl" in out
    assert np.isfinite(e_form) and np.isfinite(gap)
    assert e_form < 0  # rock salt is strongly bound (MP: about -2.1 eV/atom)
    assert gap > -0.5  # a band gap; the model is not constrained to be >= 0


def test_formats_agree(capsys, files, predictor):
    """CIF, POSCAR, extxyz and pymatgen JSON of the same crystal give the same values (JSON output)."""
    names = ["NaCl.cif", "POSCAR", "NaCl.extxyz", "NaCl.json"]
    code, out, err = run(capsys, *[str(files / n) for n in names], "--format", "json")
    assert code == 0, err
    recs = json.loads(out)
    assert len(recs) == 4 and len({r["formula"] for r in recs}) == 1
    e = np.array([r["e_form"]["value"] for r in recs])
    g = np.array([r["gap"]["value"] for r in recs])
    assert recs[0]["e_form"]["unit"] == "eV/atom" and recs[0]["gap"]["unit"] == "eV"
    np.testing.assert_allclose(e, e[0], atol=1e-4)
    np.testing.assert_allclose(g, g[0], atol=1e-4)


def test_predictor_takes_pymatgen_and_ase(files, predictor):
    from pymatgen.io.ase import AseAtomsAdaptor

    s = nacl()
    df = predictor.predict([s, AseAtomsAdaptor.get_atoms(s), str(files / "NaCl.cif"), silicon()])
    assert list(df.columns) == ["input", "formula", "e_form (eV/atom)", "gap (eV)"]
    v = df[["e_form (eV/atom)", "gap (eV)"]].to_numpy()
    np.testing.assert_allclose(v[:3], np.repeat(v[:1], 3, axis=0), atol=1e-4)
    assert not np.allclose(v[0], v[3], atol=1e-3)  # Si is not NaCl
    rec = predictor.predict(s, as_dict=True)
    assert rec["e_form"]["unit"] == "eV/atom" and rec["gap"]["unit"] == "eV"


def test_supercell_and_rotation_give_the_same_intensive_values(predictor):
    """Formation energy per atom and band gap are intensive and invariant: a 2x1x1 supercell and a
    rotated copy of NaCl must give the primitive cell's values."""
    from pymatgen.core.operations import SymmOp

    s = nacl()
    sc = s.copy()
    sc.make_supercell([2, 1, 1])
    rot = s.copy()
    rot.apply_operation(SymmOp.from_axis_angle_and_translation([1, 2, 3], 37.0))
    v = predictor.predict([s, sc, rot])[["e_form (eV/atom)", "gap (eV)"]].to_numpy()
    np.testing.assert_allclose(v[1], v[0], atol=2e-4)
    np.testing.assert_allclose(v[2], v[0], atol=2e-4)


@pytest.mark.parametrize("name,message", [
    ("CuAu_disordered.cif", "partial occupancies are not supported"),
    ("nocell.cif", "has no unit cell"),
])
def test_bad_crystals_give_one_line_errors(capsys, files, name, message):
    code, out, err = run(capsys, str(files / name))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{files / name}" in err and message in err


def test_molecule_given_to_a_crystal_model_is_refused(capsys, files):
    code, _, err = run(capsys, str(files / "water.xyz"), "--model", "mp-eform")
    assert code == 2
    assert "water.xyz: is not periodic in all three directions" in err and "mp-eform" in err


def test_mixed_inputs_get_one_table_per_model_family(capsys, files):
    code, out, err = run(capsys, str(files / "water.xyz"), str(files / "Si.cif"), "--format", "json")
    assert code == 0, err
    recs = json.loads(out)
    assert "homo" in recs[0] and "e_form" not in recs[0]
    assert "e_form" in recs[1] and "gap" in recs[1] and "homo" not in recs[1]


def test_recorded_test_mae_is_what_the_shipped_models_score(predictor):
    """Predict the 226 test structures of the official split (restricted to flla_2015) and compare the
    MAE with the one each shipped model's JSON records."""
    if not (SHARED / "materials_project" / "flla_2015.csv").exists():
        pytest.skip(f"shared data not found at {SHARED}")
    from equiformer.tasks.crystal_datamodule import CrystalDataModule

    for lm in predictor.models:
        target = lm.targets[0]["name"]
        dm = CrystalDataModule(dataset="mp_" + target, targets=[target], data_dir=str(SHARED), progress=False)
        dm.setup("test")
        test = dm.splits["test"]
        data = [dm.crystals[int(i)] for i in test]
        values = Predictor([(lm.model, lm.meta)], device="cpu").predict(data, batch_size=128)
        col = [c for c in values.columns if c.startswith(target + " (")][0]
        mae = float(np.abs(values[col].to_numpy() - dm.crystals.y_table[test, 0].numpy()).mean())
        recorded = hub.test_mae(lm.meta)[target]["value"]
        assert mae == pytest.approx(recorded, rel=1e-3, abs=1e-4), (lm.name, mae, recorded)
        assert torch.isfinite(torch.tensor(mae))


def test_band_gaps_are_never_negative_even_where_the_network_output_is():
    """mp-gap declares minimum 0 eV for its target: metals whose raw output dips below 0 print 0."""
    from ase.build import bulk

    metals = [bulk("Cu", "fcc", a=3.61), bulk("Al", "fcc", a=4.05), bulk("Na", "bcc", a=4.23),
              bulk("Fe", "bcc", a=2.87), bulk("Ni", "fcc", a=3.52), bulk("Ag", "fcc", a=4.09)]
    p = Predictor.from_pretrained("mp-gap", device="cpu")
    (lm,) = p.models
    assert lm.targets[0]["minimum"] == 0.0
    clamped = p.predict(metals)["gap (eV)"].to_numpy(float)
    assert (clamped >= 0).all()
    lm.meta["targets"][0]["minimum"] = None  # the raw network output (hub.denormalize reads the metadata)
    raw = p.predict(metals)["gap (eV)"].to_numpy(float)
    assert (raw < 0).any(), raw  # the clamp is exercised by these inputs
    np.testing.assert_allclose(clamped, np.maximum(raw, 0.0))
