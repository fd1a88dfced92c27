"""read(): every format checked against an independent reader (ASE, pymatgen, RDKit) on real
data, and every malformed file gives one clear message naming the file and the problem."""

from __future__ import annotations

import ast
import gzip
import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from equiformer.data import StructureError, from_ase, guess_format, read

FILES = Path(__file__).resolve().parent / "files"
BAD = FILES / "malformed"
SHARED = Path(os.environ.get("EQUIFORMER_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _qm9_rows(n: int = 60):
    import pandas as pd

    spec = importlib.util.find_spec("qm9pack")
    if spec is None:
        pytest.skip("qm9pack is not installed")
    csv = Path(spec.submodule_search_locations[0]) / "data" / "qm9_part1.csv"
    df = pd.read_csv(csv, nrows=n, usecols=["XYZ_file", "SMILES", "Elements", "XYZ_Ang"])
    out = []
    for r in df.itertuples():
        out.append((r.XYZ_file, r.SMILES, ast.literal_eval(r.Elements), np.asarray(ast.literal_eval(r.XYZ_Ang))))
    return out


def _mp(ids: tuple[str, ...]):
    import pandas as pd
    from pymatgen.core import Structure

    path = SHARED / "materials_project" / "flla_2015.csv"
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    df = pd.read_csv(path, comment="#")
    rows = df[df["material_id"].isin(ids)]
    return {r.material_id: Structure.from_dict(ast.literal_eval(r.structure)) for r in rows.itertuples()}


def _frac(data) -> np.ndarray:
    return np.linalg.solve(data.cell[0].double().numpy().T, data.pos.double().numpy().T).T


def _same_frac(a: np.ndarray, b: np.ndarray, atol: float) -> None:
    d = (a - b + 0.5) % 1.0 - 0.5  # equal up to whole lattice translations
    assert np.abs(d).max() < atol, np.abs(d).max()


def _same_sites(z_a, frac_a, z_b, frac_b, atol: float) -> None:
    """The same atoms in any order: each (z, fractional position) of a matches one of b."""
    assert sorted(z_a) == sorted(z_b)
    used: set[int] = set()
    for zi, fa in zip(z_a, frac_a):
        d = np.abs((frac_b - fa + 0.5) % 1.0 - 0.5).max(axis=1)
        j = next((j for j in np.argsort(d) if z_b[j] == zi and j not in used), None)
        assert j is not None and d[j] < atol, (zi, fa, d.min())
        used.add(int(j))


# ------------------------------------------------------------------ molecules: QM9 xyz / sdf


def test_qm9_molecules_written_as_xyz_and_sdf_read_back(tmp_path):
    import ase.io
    from ase import Atoms
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds

    rows = _qm9_rows(60)
    frames = [Atoms(symbols=el, positions=pos) for _, _, el, pos in rows]
    ase.io.write(tmp_path / "qm9.xyz", frames, format="xyz")  # ASE's plain XYZ writer
    writer = Chem.SDWriter(str(tmp_path / "qm9.sdf"))
    for name, _, el, pos in rows:
        block = "\n".join([str(len(el)), name] + [f"{e} {x:.10f} {y:.10f} {z:.10f}" for e, (x, y, z) in zip(el, pos)])
        mol = Chem.MolFromXYZBlock(block)
        rdDetermineBonds.DetermineConnectivity(mol)
        mol.SetProp("_Name", name)
        writer.write(mol)
    writer.close()

    xyz = read(tmp_path / "qm9.xyz", dtype=F64)
    sdf = read(tmp_path / "qm9.sdf", dtype=F64, sanitize=False)
    assert len(xyz) == len(sdf) == len(rows)
    for i, ((name, _, el, pos), dx, ds) in enumerate(zip(rows, xyz, sdf)):
        z = [Chem.GetPeriodicTable().GetAtomicNumber(e) for e in el]
        assert dx.z.tolist() == z and ds.z.tolist() == z
        np.testing.assert_allclose(dx.pos.numpy(), pos, atol=1e-8, rtol=0)  # ASE writes 8+ decimals
        np.testing.assert_allclose(ds.pos.numpy(), pos, atol=1e-4, rtol=0)  # molfiles keep 4 decimals
        assert dx.index == ds.index == i
        assert dx.source == f"{tmp_path / 'qm9.xyz'}[{i}]"
        assert ds.name == name
        assert torch.count_nonzero(dx.cell) == 0 and not dx.pbc.any()


def test_shipped_qm9_files_agree_with_csv_ase_and_rdkit():
    import ase.io
    from rdkit import Chem

    xyz = read(FILES / "qm9_3.xyz", dtype=F64)
    sdf = read(FILES / "qm9_3.sdf", dtype=F64)
    ase_xyz = ase.io.read(FILES / "qm9_3.xyz", index=":")
    rd = list(Chem.SDMolSupplier(str(FILES / "qm9_3.sdf"), removeHs=False))
    by_name = {name.removesuffix(".xyz"): (smiles, pos) for name, smiles, _, pos in _qm9_rows(1000)}
    for dx, ds, atoms, mol in zip(xyz, sdf, ase_xyz, rd, strict=True):
        qm9_id = ds.name
        smiles, pos = by_name[qm9_id]
        assert dx.name == f"QM9 {qm9_id} {smiles}"
        np.testing.assert_allclose(dx.pos.numpy(), pos, atol=1e-10, rtol=0)
        np.testing.assert_allclose(dx.pos.numpy(), atoms.positions, atol=0, rtol=0)
        assert dx.z.tolist() == atoms.numbers.tolist() == ds.z.tolist()
        np.testing.assert_allclose(ds.pos.numpy(), mol.GetConformer().GetPositions(), atol=0, rtol=0)
        assert ds.smiles == Chem.MolToSmiles(Chem.RemoveHs(mol))
        assert Chem.CanonSmiles(ds.smiles) == Chem.CanonSmiles(smiles)


def test_single_molfile_without_terminator(tmp_path):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles("c1ccncc1"))
    assert AllChem.EmbedMolecule(mol, randomSeed=7) == 0
    mol.SetProp("_Name", "pyridine")
    (tmp_path / "pyridine.mol").write_text(Chem.MolToMolBlock(mol) + "\n\n")
    (d,) = read(tmp_path / "pyridine.mol", dtype=F64)
    assert d.source == str(tmp_path / "pyridine.mol") and d.name == "pyridine"
    assert d.smiles == "c1ccncc1" and d.z.tolist() == [a.GetAtomicNum() for a in mol.GetAtoms()]
    np.testing.assert_allclose(d.pos.numpy(), mol.GetConformer().GetPositions(), atol=1e-4)


def test_qm9_original_xyz_layout_with_mathematica_numbers(tmp_path):
    # QM9's dsgdb9nsd_*.xyz: charges in column 5, "*^" exponents, then frequencies, SMILES, InChI
    text = (
        "5\ngdb 1\t157.7118\t157.70997\t157.70699\t0.\t13.21\n"
        "C\t-0.0126981359\t 1.0858041578\t 0.0080009958\t-0.535689\n"
        "H\t 0.002150416\t-0.0060313176\t 0.0019761204\t 0.133921\n"
        "H\t 1.0117308433\t 1.4637511618\t 0.0002765748\t 0.133922\n"
        "H\t-0.540815069\t 1.4475266138\t-0.8766437152\t 0.133923\n"
        "H\t-0.5238136345\t 1.4379326443\t 9.063972942*^-1\t 0.133923\n"
        "1341.307\t1341.3284\t1341.365\t1562.6731\t1562.7453\t3038.3205\t3151.6034\t3151.6788\t3151.7078\n"
        "C\tC\t\nInChI=1S/CH4/h1H4\tInChI=1S/CH4/h1H4\n"
    )
    (tmp_path / "dsgdb9nsd_000001.xyz").write_text(text)
    (d,) = read(tmp_path / "dsgdb9nsd_000001.xyz", dtype=F64)
    row = _qm9_rows(1)[0]
    np.testing.assert_allclose(d.pos.numpy(), row[3], atol=1e-10, rtol=0)
    assert d.smiles == "C" and d.z.tolist() == [6, 1, 1, 1, 1]


# -------------------------------------------------------------------- crystals: CIF / POSCAR


def test_mp_crystals_written_as_cif_and_poscar_read_back(tmp_path):
    from pymatgen.io.cif import CifWriter
    from pymatgen.io.vasp import Poscar

    structures = _mp(("mp-390", "mp-10", "mp-10000", "mp-10062", "mp-10096"))
    assert len(structures) == 5
    for mid, s in structures.items():
        CifWriter(s).write_file(tmp_path / f"{mid}.cif")
        Poscar(s).write_file(tmp_path / f"POSCAR_{mid}")
        (cif,) = read(tmp_path / f"{mid}.cif", dtype=F64)
        (pos,) = read(tmp_path / f"POSCAR_{mid}", dtype=F64)
        z = [site.specie.Z for site in s]
        assert pos.z.tolist() == z
        # POSCAR keeps the lattice matrix itself
        np.testing.assert_allclose(pos.cell[0].numpy(), s.lattice.matrix, atol=1e-6, rtol=0)
        np.testing.assert_allclose(pos.pos.numpy(), s.cart_coords, atol=1e-6, rtol=0)
        # a CIF keeps the cell's shape (a, b, c, angles), not its orientation: compare metrics
        c = cif.cell[0].numpy()
        np.testing.assert_allclose(c @ c.T, s.lattice.matrix @ s.lattice.matrix.T, atol=1e-6, rtol=0)
        _same_sites(cif.z.tolist(), _frac(cif), z, s.frac_coords, 1e-6)  # CifWriter may regroup sites
        assert pos.pbc.all() and cif.pbc.all()
        assert pos.source == str(tmp_path / f"POSCAR_{mid}")


def test_shipped_tio2_cif_poscar_json_agree_with_ase_and_pymatgen():
    import ase.io
    from pymatgen.core import Structure

    ref = _mp(("mp-390",))["mp-390"]
    cif = read(FILES / "TiO2_mp-390.cif", dtype=F64)[0]
    poscar = read(FILES / "POSCAR_mp-390", dtype=F64)[0]
    js = read(FILES / "TiO2_mp-390.json", dtype=F64)[0]
    assert poscar.name == "TiO2 mp-390 (anatase), Materials Project"
    np.testing.assert_allclose(js.cell[0].numpy(), ref.lattice.matrix, atol=1e-12, rtol=0)
    np.testing.assert_allclose(js.pos.numpy(), ref.cart_coords, atol=1e-12, rtol=0)
    # independent readers of the same files
    a_pos = ase.io.read(FILES / "POSCAR_mp-390", format="vasp")
    np.testing.assert_allclose(poscar.cell[0].numpy(), a_pos.cell.array, atol=1e-12, rtol=0)
    np.testing.assert_allclose(poscar.pos.numpy(), a_pos.positions, atol=1e-10, rtol=0)
    assert poscar.z.tolist() == a_pos.numbers.tolist()
    p_pos = Structure.from_file(FILES / "POSCAR_mp-390")
    np.testing.assert_allclose(poscar.pos.numpy(), p_pos.cart_coords, atol=1e-10, rtol=0)
    a_cif = ase.io.read(FILES / "TiO2_mp-390.cif")
    assert sorted(cif.z.tolist()) == sorted(a_cif.numbers.tolist())
    np.testing.assert_allclose(
        cif.cell[0].numpy() @ cif.cell[0].numpy().T, a_cif.cell.array @ a_cif.cell.array.T, atol=1e-6, rtol=0
    )
    assert abs(abs(np.linalg.det(cif.cell[0].numpy())) - a_cif.get_volume()) < 1e-6


def test_cif_with_symmetry_and_two_blocks_of_the_same_name_match_ase(tmp_path):
    import ase.io
    from pymatgen.io.cif import CifWriter

    s = _mp(("mp-390",))["mp-390"]
    sym = str(CifWriter(s, symprec=0.01))  # asymmetric unit + space group I4_1/amd operations
    assert "_atom_site_symmetry_multiplicity" in sym and "'x, y, z'" in sym
    (tmp_path / "sym.cif").write_text(sym)
    (d,) = read(tmp_path / "sym.cif", dtype=F64)
    atoms = ase.io.read(tmp_path / "sym.cif")  # ASE expands the symmetry on its own
    assert sorted(d.z.tolist()) == sorted(atoms.numbers.tolist())
    c = d.cell[0].numpy()
    np.testing.assert_allclose(c @ c.T, atoms.cell.array @ atoms.cell.array.T, atol=1e-6)
    frac_ase = atoms.get_scaled_positions()
    _same_sites(d.z.tolist(), _frac(d), atoms.numbers.tolist(), frac_ase, 1e-6)
    # the conventional cell holds twice the primitive cell of mp-390
    assert len(d.z) == 2 * len(s) and abs(np.linalg.det(c)) == pytest.approx(2 * s.volume, rel=1e-6)
    # two blocks both named data_TiO2 stay two structures
    (tmp_path / "two.cif").write_text(sym + (FILES / "TiO2_mp-390.cif").read_text())
    a, b = read(tmp_path / "two.cif", dtype=F64)
    assert (a.source, b.source) == (f"{tmp_path / 'two.cif'}[0]", f"{tmp_path / 'two.cif'}[1]")
    assert len(a.z) == 12 and len(b.z) == 6


def test_poscar_variants_cartesian_volume_scale_selective_dynamics_vasp4(tmp_path):
    import ase.io

    ref = read(FILES / "POSCAR_mp-390", dtype=F64)[0]
    lines = (FILES / "POSCAR_mp-390").read_text().splitlines()
    lattice = ref.cell[0].numpy()
    vol = abs(np.linalg.det(lattice))
    cart = [" ".join(f"{v:.12f}" for v in p) for p in ref.pos.numpy() / 2.0]
    flags = ["F F F", "F F F", "T T T", "T T T", "T F T", "F F F"]
    variants = {
        # half-length lattice, scale 2, Cartesian positions (also scaled)
        "cart": [lines[0], "2.0"] + [" ".join(f"{v:.12f}" for v in row / 2.0) for row in lattice]
        + lines[5:7] + ["Cartesian"] + cart,
        # negative scale = target volume
        "volume": [lines[0], f"-{vol:.12f}"] + lines[2:],
        "selective": lines[:7] + ["Selective dynamics", "Direct"]
        + [f"{ln.split()[0]} {ln.split()[1]} {ln.split()[2]} {f}" for ln, f in zip(lines[8:14], flags)],
        "vasp4": ["O Ti anatase"] + lines[1:5] + lines[6:],
    }
    for name, content in variants.items():
        path = tmp_path / f"{name}.vasp"
        path.write_text("\n".join(content) + "\n")
        (d,) = read(path, dtype=F64)
        np.testing.assert_allclose(d.cell[0].numpy(), lattice, atol=1e-9, rtol=0, err_msg=name)
        np.testing.assert_allclose(d.pos.numpy(), ref.pos.numpy(), atol=1e-9, rtol=0, err_msg=name)
        assert d.z.tolist() == ref.z.tolist()
        if name != "vasp4":
            a = ase.io.read(path, format="vasp")
            np.testing.assert_allclose(d.pos.numpy(), a.positions, atol=1e-9, rtol=0, err_msg=name)
    sel = read(tmp_path / "selective.vasp")[0]
    assert sel.fixed.tolist() == [True, True, False, False, False, True]


# ----------------------------------------------------- extended XYZ and ASE trajectories (OC20)


def test_oc20_extxyz_matches_ase_and_the_trajectory():
    import ase.io

    ours = read(FILES / "oc20_random1000156_first3.extxyz", dtype=F64)
    theirs = ase.io.read(FILES / "oc20_random1000156_first3.extxyz", index=":")
    traj = read(FILES / "oc20_random1000156_first2.traj", dtype=F64)
    assert len(ours) == len(theirs) == 3 and len(traj) == 2
    for i, (d, atoms) in enumerate(zip(ours, theirs)):
        ref = from_ase(atoms, dtype=F64)
        for key in ("z", "pos", "cell", "pbc", "energy", "forces", "fixed"):
            assert torch.equal(d[key], ref[key]), (i, key)
        assert d.index == i
    for d, t in zip(ours, traj):  # extxyz keeps the trajectory's numbers (ASE writes full precision)
        for key in ("z", "pos", "cell", "pbc", "energy", "forces", "fixed"):
            torch.testing.assert_close(d[key], t[key], rtol=0, atol=1e-8)
    assert int(ours[0].fixed.sum()) == 36


def test_extxyz_options_energy_key_tags_and_partial_pbc(tmp_path):
    text = (
        "2\n"
        'Lattice="3.0 0.0 0.0 0.0 3.0 0.0 0.0 0.0 20.0" Properties=species:S:1:pos:R:3:tags:I:1:REF_forces:R:3 '
        'REF_energy=-3.5 pbc="T T F" name="H2 on a grid"\n'
        "H 0.0 0.0 10.0 1 0.1 0.2 0.3\n"
        "H 0.0 0.0 10.74 2 -0.1 -0.2 -0.3\n"
    )
    (tmp_path / "h2.extxyz").write_text(text)
    (plain,) = read(tmp_path / "h2.extxyz", dtype=F64)
    assert "energy" not in plain and "forces" not in plain
    assert plain.pbc.tolist() == [[True, True, False]] and plain.name == "H2 on a grid"
    assert plain.tags.tolist() == [1, 2]
    (ref,) = read(tmp_path / "h2.extxyz", energy_key="REF_energy", forces_key="REF_forces", dtype=F64)
    assert ref.energy.tolist() == [-3.5]
    assert ref.forces.tolist() == [[0.1, 0.2, 0.3], [-0.1, -0.2, -0.3]]


# ----------------------------------------------------------------------- PDB and JSON


def test_pdb_matches_rdkit_and_ase():
    import ase.io
    from rdkit import Chem

    (d,) = read(FILES / "1PPE_l_u.pdb", dtype=F64)
    mol = Chem.MolFromPDBFile(str(FILES / "1PPE_l_u.pdb"), removeHs=False, sanitize=False)
    atoms = ase.io.read(FILES / "1PPE_l_u.pdb")
    assert d.z.tolist() == [a.GetAtomicNum() for a in mol.GetAtoms()] == atoms.numbers.tolist()
    np.testing.assert_allclose(d.pos.numpy(), mol.GetConformer().GetPositions(), atol=1e-9, rtol=0)
    np.testing.assert_allclose(d.pos.numpy(), atoms.positions, atol=1e-9, rtol=0)
    assert not d.pbc.any()
    info = [mol.GetAtomWithIdx(i).GetPDBResidueInfo() for i in range(mol.GetNumAtoms())]
    assert d.residues == [r.GetResidueName() for r in info]
    assert d.atom_names == [r.GetName().strip() for r in info]
    assert d.residue_numbers.tolist() == [r.GetResidueNumber() for r in info]
    assert set(d.chains) == {"A"}


def test_pdb_models_altloc_and_element_from_atom_name(tmp_path):
    atom = "ATOM  {:5d} {:<4}{}{:3} A{:4d}    {:8.3f}{:8.3f}{:8.3f}  1.00  0.00          {:>2}"
    lines = [
        "MODEL        1",
        atom.format(1, " N", " ", "GLY", 1, 0.0, 0.0, 0.0, ""),
        atom.format(2, " CA", "A", "GLY", 1, 1.45, 0.0, 0.0, ""),
        atom.format(3, " CA", "B", "GLY", 1, 1.50, 0.2, 0.0, ""),
        atom.format(4, "HA2", " ", "GLY", 1, 1.8, 1.0, 0.0, ""),
        "ENDMDL",
        "MODEL        2",
        atom.format(1, " N", " ", "GLY", 1, 0.0, 0.0, 0.1, "N"),
        atom.format(2, " CA", " ", "GLY", 1, 1.45, 0.0, 0.1, "C"),
        atom.format(4, "HA2", " ", "GLY", 1, 1.8, 1.0, 0.1, "H"),
        "ENDMDL",
        "END",
    ]
    (tmp_path / "gly.pdb").write_text("\n".join(lines) + "\n")
    m1, m2 = read(tmp_path / "gly.pdb", dtype=F64)
    assert m1.z.tolist() == m2.z.tolist() == [7, 6, 1]
    assert m1.pos[1].tolist() == [1.45, 0.0, 0.0]  # altLoc A kept, B dropped
    assert m2.source.endswith("gly.pdb[1]") and m2.index == 1


def test_json_list_of_structures_and_molecule(tmp_path):
    import json

    from pymatgen.core import Molecule

    s = _mp(("mp-390",))["mp-390"]
    mol = Molecule(["O", "H", "H"], [[0, 0, 0.119], [0, 0.763, -0.477], [0, -0.763, -0.477]])
    docs = [s.as_dict(), {"material_id": "mp-390", "structure": s.as_dict()}, mol.as_dict()]
    (tmp_path / "many.json").write_text(json.dumps(docs))
    a, b, c = read(tmp_path / "many.json", dtype=F64)
    assert torch.equal(a.pos, b.pos) and a.pbc.all()
    assert c.z.tolist() == [8, 1, 1] and not c.pbc.any()
    assert c.source.endswith("many.json[2]")


# ------------------------------------------------------------------- format detection


def test_format_detection_and_gzip(tmp_path):
    assert guess_format("POSCAR") == guess_format("CONTCAR_relaxed") == guess_format("x.vasp") == "poscar"
    assert guess_format("a/b/water.XYZ") == "xyz" and guess_format("m.mol") == "mol"
    assert guess_format("t.cif.gz") == "cif"
    shutil.copy(FILES / "POSCAR_mp-390", tmp_path / "anatase.txt")
    with pytest.raises(StructureError, match=r"anatase.txt: unsupported file format '.txt' \(supported: "):
        read(tmp_path / "anatase.txt")
    (d,) = read(tmp_path / "anatase.txt", format="vasp", dtype=F64)
    (ref,) = read(FILES / "POSCAR_mp-390", dtype=F64)
    assert torch.equal(d.pos, ref.pos)
    with gzip.open(tmp_path / "qm9.xyz.gz", "wt") as fh:
        fh.write((FILES / "qm9_3.xyz").read_text())
    gz = read(tmp_path / "qm9.xyz.gz", dtype=F64)
    assert [torch.equal(a.pos, b.pos) for a, b in zip(gz, read(FILES / "qm9_3.xyz", dtype=F64))] == [True] * 3
    (ase_read,) = read(FILES / "TiO2_mp-390.cif", format="ase:cif", dtype=F64)
    assert ase_read.z.tolist() and ase_read.pbc.all()


# -------------------------------------------------------------------- malformed files


def _message(path, **kw) -> str:
    with pytest.raises(StructureError) as exc:
        read(path, **kw)
    msg = str(exc.value)
    assert "\n" not in msg
    # no chained third-party traceback is shown
    assert exc.value.__cause__ is None and (exc.value.__context__ is None or exc.value.__suppress_context__)
    return msg


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("water.xyz", "water.xyz line 4: expected 4 columns (element x y z), got 2"),
        ("NaCl_partial.cif", "NaCl_partial.cif: partial occupancies are not supported (site 0: Na:0.5, K:0.5)"),
        (
            "TiO2_nocell.cif",
            "TiO2_nocell.cif: data block 'TiO2' (line 2) has no unit cell (missing _cell_length_a, _cell_angle_beta)",
        ),
        (
            "qm9_pentavalent.sdf",
            "qm9_pentavalent.sdf[1] (record starting at line 20): RDKit cannot sanitise the molecule: "
            "Explicit valence for atom # 0 C, 5, is greater than permitted (read it with sanitize=False to keep it)",
        ),
        (
            "qm9_bad_counts.sdf",
            "qm9_bad_counts.sdf[1] (record starting at line 20): cannot read the molecule: "
            "Cannot convert ' xx' to unsigned int on line 23",
        ),
        ("acetylene_2d.sdf", "acetylene_2d.sdf (record starting at line 1): molecule has 2D coordinates only"),
        ("POSCAR_counts", "POSCAR_counts line 7: expected 2 atom counts (one per element O Ti), got '4'"),
        ("POSCAR_truncated", "POSCAR_truncated line 11: file ends after 2 of 6 atom positions"),
        ("1PPE_bad_coords.pdb", "1PPE_bad_coords.pdb line 5: cannot read coordinates from columns 31-54"),
    ],
)
def test_shipped_malformed_files(name, expected):
    msg = _message(BAD / name)
    assert msg.startswith(f"{BAD / name.split()[0]}"), msg
    assert msg.startswith(f"{BAD}{os.sep}{expected}"), msg


def test_sanitize_false_keeps_the_pentavalent_record():
    datas = read(BAD / "qm9_pentavalent.sdf", sanitize=False)
    assert len(datas) == 3 and datas[1].z.tolist()[:4] == [6, 6, 6, 6]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("count.xyz", "three\nwater\n", "count.xyz line 1: expected the number of atoms (an integer), got 'three'"),
        (
            "trunc.xyz",
            "3\nwater\nO 0 0 0.119\nH 0 0.763 -0.477\n",
            "trunc.xyz line 4: file ends after 2 of 3 atom lines (the count on line 1 says 3)",
        ),
        ("elem.xyz", "2\n\nXx 0 0 0\nH 0 0 1\n", "elem.xyz line 3: unknown element 'Xx'"),
        ("num.xyz", "2\n\nO 0 0 0\nH 0 abc 1\n", "num.xyz line 4: cannot read coordinate 'abc' as a number"),
        (
            "nan.xyz",
            "2\n\nO 0 0 0\nH 0 nan 1\n",
            "nan.xyz (structure at line 1): atom 1 has non-finite coordinates [0.0, nan, 1.0]",
        ),
        (
            "ovl.xyz",
            "2\n\nH 0 0 0\nH 0 0 0.74\n2\n\nH 0 0 0\nH 0 0 0.05\n",
            "ovl.xyz[1] (structure at line 5): atoms 0 and 1 overlap (closer than 0.1 Å)",
        ),
        ("empty.xyz", "  \n", "empty.xyz: file is empty"),
        (
            "zero.xyz",
            "0\nnothing\n",
            "zero.xyz line 1: number of atoms is 0 (empty structure)",
        ),
        (
            "lat.extxyz",
            '2\nLattice="1 0 0 0 1" pbc="T T T"\nH 0 0 0\nH 0 0 0.7\n',
            "lat.extxyz line 2: Lattice must hold 9 numbers (3 lattice vectors), got '1 0 0 0 1'",
        ),
        (
            "cols.extxyz",
            '2\nLattice="5 0 0 0 5 0 0 0 5" Properties=species:S:1:pos:R:3:forces:R:3\nH 0 0 0 0 0 0\nH 0 0 0.7\n',
            "cols.extxyz line 4: expected 7 columns (species pos[3] forces[3]), got 4",
        ),
        (
            "nolat.extxyz",
            '1\nProperties=species:S:1:pos:R:3 pbc="T T T"\nH 0 0 0\n',
            "nolat.extxyz line 2: pbc says periodic but there is no Lattice (the cell)",
        ),
        ("garbage.cif", "this is not a cif\n", "garbage.cif: no crystal structure (no data block with"),
        ("bad.json", '{"lattice": [1,2,\n}', "bad.json line 2: not valid JSON (Expecting value)"),
        ("dict.json", '{"a": 1, "b": 2}', "dict.json: not a pymatgen Structure or Molecule dictionary (found: a, b)"),
        ("noatoms.pdb", "HEADER    nothing\nEND\n", "noatoms.pdb: no ATOM or HETATM records"),
        ("bad.traj", "not a trajectory", "bad.traj: cannot read the file as traj ("),
        ("x.foo", "hello", "x.foo: unsupported file format '.foo' (supported: .cif, "),
        ("bin.xyz", "\x00\x01binary", "bin.xyz: binary data, not a text file (expected xyz)"),
        (
            "POSCAR_elem",
            "x\n1.0\n3 0 0\n0 3 0\n0 0 3\nO Qq\n1 1\nDirect\n0 0 0\n0.5 0.5 0.5\n",
            "POSCAR_elem line 6: unknown element 'Qq' in the element line",
        ),
        (
            "POSCAR_v4",
            "no names here\n1.0\n3 0 0\n0 3 0\n0 0 3\n1 1\nDirect\n0 0 0\n0.5 0.5 0.5\n",
            "POSCAR_v4 line 6: no element symbols (VASP 4 format)",
        ),
        (
            "POSCAR_mode",
            "x\n1.0\n3 0 0\n0 3 0\n0 0 3\nNa Cl\n1 1\nFractional\n0 0 0\n0.5 0.5 0.5\n",
            "POSCAR_mode line 8: expected 'Direct' or 'Cartesian', got 'Fractional'",
        ),
    ],
)
def test_inline_malformed_files(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    msg = _message(path)
    assert msg.startswith(f"{tmp_path}{os.sep}{expected}"), msg


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.cif: no such file"):
        read(tmp_path / "nothere.cif")
    with pytest.raises(StructureError, match="is a directory"):
        read(tmp_path)
    with pytest.raises(StructureError, match=r"unsupported format 'png'"):
        read(FILES / "qm9_3.xyz", format="png")
