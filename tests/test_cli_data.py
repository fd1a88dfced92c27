"""`equiformer data inspect`: what a chemist sees, checked against independent readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from equiformer.cli import main

FILES = Path(__file__).resolve().parent / "files"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_inspect_crystal_table_matches_pymatgen(capsys):
    from pymatgen.core import Structure

    path = str(FILES / "TiO2_mp-390.cif")
    assert main(["data", "inspect", path]) == 0
    out = capsys.readouterr().out
    s = Structure.from_file(path)
    lat = s.lattice
    assert f"{path}: 1 structure" in out
    assert "O4Ti2  (6 atoms: " in out and "Ti 2" in out and "O 4" in out
    assert "periodic   yes, in 3D (a crystal)" in out
    assert f"a = {lat.a:.4f} Å, b = {lat.b:.4f} Å, c = {lat.c:.4f} Å" in out
    assert f"α = {lat.alpha:.2f}°, β = {lat.beta:.2f}°, γ = {lat.gamma:.2f}°" in out
    assert f"volume     {lat.volume:.4f} Å³" in out
    assert "energy     not in the file" in out and "forces     not in the file" in out
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("  cell (Å)   a = "))
    rows = [[float(v) for v in line.split("=")[1].split()] for line in lines[first : first + 3]]
    assert [line.split("=")[0].strip()[-1] for line in lines[first : first + 3]] == ["a", "b", "c"]
    np.testing.assert_allclose(rows, lat.matrix, atol=1e-6)


def test_inspect_molecules_and_slab_frames(capsys):
    import ase.io

    xyz = str(FILES / "qm9_3.xyz")
    traj = str(FILES / "oc20_random1000156_first3.extxyz")
    assert main(["data", "inspect", xyz, traj]) == 0
    out = capsys.readouterr().out
    assert f"{xyz}: 3 structures" in out and f"{traj}: 3 structures" in out
    assert f"{xyz}[1]  (index 1)" in out and "C4H10  (14 atoms: C 4, H 10)" in out
    assert "periodic   no (a molecule: no cell)" in out
    frames = ase.io.read(traj, index=":")
    for atoms in frames:
        assert f"energy     {atoms.get_potential_energy():.6f} eV" in out
        fmax = np.linalg.norm(atoms.get_forces(apply_constraint=False), axis=1).max()
        assert f"forces     yes (largest |F| = {fmax:.4f} eV/Å)" in out
    n_fixed = len(frames[0].constraints[0].get_indices())
    assert out.count(f"fixed      {n_fixed} of 49 atoms held fixed") == 3


def test_inspect_json_matches_ase(capsys):
    import ase.io

    traj = str(FILES / "oc20_random1000156_first2.traj")
    assert main(["data", "inspect", traj, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    frames = ase.io.read(traj, index=":")
    assert len(rows) == len(frames) == 2
    for i, (row, atoms) in enumerate(zip(rows, frames)):
        assert row["file"] == traj and row["index"] == i and row["source"] == f"{traj}[{i}]"
        assert row["n_atoms"] == len(atoms) and row["formula"] == "HNa36Tl12"
        np.testing.assert_allclose(row["cell"], atoms.cell.array, atol=1e-6)
        assert row["pbc"] == atoms.pbc.tolist()
        par = atoms.cell.cellpar()
        got = [row["lattice"][k] for k in ("a", "b", "c", "alpha", "beta", "gamma")]
        np.testing.assert_allclose(got, par, atol=1e-4)
        assert row["volume"] == pytest.approx(atoms.get_volume(), rel=1e-6)
        assert row["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-5)
        assert row["forces"] is True


def test_inspect_limits_long_files(capsys):
    assert main(["data", "inspect", str(FILES / "qm9_3.sdf"), "--max", "1"]) == 0
    out = capsys.readouterr().out
    assert "(index 0)" in out and "(index 1)" not in out
    assert "... 2 more structures not shown (use --max 0 to show all)" in out
    assert "SMILES     C#C" in out and "name       dsgdb9nsd_000004" in out


def test_inspect_protein_counts_residues_like_rdkit(capsys):
    from rdkit import Chem

    path = str(FILES / "1PPE_l_u.pdb")
    mol = Chem.MolFromPDBFile(path, removeHs=False, sanitize=False)
    residues = {(a.GetPDBResidueInfo().GetChainId(), a.GetPDBResidueInfo().GetResidueNumber()) for a in mol.GetAtoms()}
    assert main(["data", "inspect", path]) == 0
    out = capsys.readouterr().out
    assert f"protein    {len(residues)} residues in chain A" in out
    assert f"({mol.GetNumAtoms()} atoms: " in out


def test_inspect_file_format_option(tmp_path, capsys):
    target = tmp_path / "anatase.txt"
    target.write_text((FILES / "POSCAR_mp-390").read_text())
    assert main(["data", "inspect", str(target), "--file-format", "poscar"]) == 0
    assert "O4Ti2" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("malformed/water.xyz", "water.xyz line 4: expected 4 columns (element x y z), got 2"),
        ("malformed/NaCl_partial.cif", "NaCl_partial.cif: partial occupancies are not supported"),
        ("nothere.cif", "nothere.cif: no such file"),
    ],
)
def test_inspect_bad_file_gives_one_line_and_exit_code_2(name, fragment, capsys):
    path = str(FILES / name)
    assert main(["data", "inspect", str(FILES / "qm9_3.xyz"), path]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("equiformer data: error: ") and fragment in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert captured.out == ""  # nothing half-printed before the error


def test_data_without_action_prints_help(capsys):
    assert main(["data"]) == 0
    assert "inspect" in capsys.readouterr().out
