"""Regenerate the real structure files in tests/files from their public sources.

Run from the repository root: ``python tests/files/make_files.py`` (needs ../shared/data and
the ``qm9pack`` package). Every file written here is real data:

* ``qm9_3.xyz`` / ``qm9_3.sdf``: QM9 molecules dsgdb9nsd_000004 (acetylene), _000021 and
  _001000 from qm9pack's ``qm9_part1.csv`` (Å); the SDF bonds are perceived by RDKit from
  the geometry, the title is the QM9 id, an SD field keeps the QM9 SMILES.
* ``TiO2_mp-390.cif``, ``POSCAR_mp-390``, ``TiO2_mp-390.json``: Materials Project mp-390
  (anatase TiO2) from ``materials_project/flla_2015.csv`` written by pymatgen.
* ``oc20_random1000156_first3.extxyz`` / ``oc20_random1000156_first2.traj``: the first
  frames of an OC20 relaxation (energies in eV, forces in eV/Å, FixAtoms) written by ASE.
* ``1PPE_l_u.pdb`` is copied unchanged from Docking Benchmark 5.5 (ligand of 1PPE, unbound).
"""

from __future__ import annotations

import ast
import importlib.util
import io
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("EQUIFORMER_SHARED_DATA", HERE.parents[1].parent / "shared" / "data"))
QM9_IDS = ("dsgdb9nsd_000004.xyz", "dsgdb9nsd_000021.xyz", "dsgdb9nsd_001000.xyz")


def qm9_rows() -> pd.DataFrame:
    root = importlib.util.find_spec("qm9pack").submodule_search_locations[0]
    df = pd.read_csv(Path(root) / "data" / "qm9_part1.csv", nrows=1000)
    return df[df["XYZ_file"].isin(QM9_IDS)]


def write_qm9() -> None:
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds

    rows = qm9_rows()
    xyz_lines: list[str] = []
    writer_buf = io.StringIO()
    writer = Chem.SDWriter(writer_buf)
    for _, row in rows.iterrows():
        elements = ast.literal_eval(row["Elements"])
        pos = np.asarray(ast.literal_eval(row["XYZ_Ang"]), dtype=float)
        name = row["XYZ_file"].removesuffix(".xyz")
        xyz_lines.append(str(len(elements)))
        xyz_lines.append(f"QM9 {name} {row['SMILES']}")
        xyz_lines += [f"{e:<2} {x:16.10f} {y:16.10f} {z:16.10f}" for e, (x, y, z) in zip(elements, pos)]
        block = "\n".join([str(len(elements)), name] + [f"{e} {x} {y} {z}" for e, (x, y, z) in zip(elements, pos)])
        mol = Chem.MolFromXYZBlock(block)
        rdDetermineBonds.DetermineBonds(mol, charge=0)
        mol.SetProp("_Name", name)
        mol.SetProp("QM9_SMILES", row["SMILES"])
        writer.write(mol)
    writer.close()
    (HERE / "qm9_3.xyz").write_text("\n".join(xyz_lines) + "\n")
    (HERE / "qm9_3.sdf").write_text(writer_buf.getvalue())


def mp_structure(material_id: str):
    from pymatgen.core import Structure

    df = pd.read_csv(SHARED / "materials_project" / "flla_2015.csv", comment="#")
    row = df[df["material_id"] == material_id].iloc[0]
    return Structure.from_dict(ast.literal_eval(row["structure"]))


def write_mp() -> None:
    from pymatgen.io.cif import CifWriter
    from pymatgen.io.vasp import Poscar

    s = mp_structure("mp-390")
    CifWriter(s).write_file(HERE / "TiO2_mp-390.cif")
    Poscar(s, comment="TiO2 mp-390 (anatase), Materials Project").write_file(HERE / "POSCAR_mp-390")
    (HERE / "TiO2_mp-390.json").write_text(s.to_json())


def write_oc20() -> None:
    import ase.io

    with tarfile.open(SHARED / "oc20" / "oc20_relaxation_trajectories.tar.gz") as tar:
        member = tar.extractfile("trajs/random1000156.traj")
        assert member is not None
        tmp = HERE / "_tmp.traj"
        tmp.write_bytes(member.read())
    frames = ase.io.read(tmp, index=":3")
    tmp.unlink()
    ase.io.write(HERE / "oc20_random1000156_first3.extxyz", frames, format="extxyz")
    ase.io.write(HERE / "oc20_random1000156_first2.traj", frames[:2], format="traj")


def write_pdb() -> None:
    with tarfile.open(SHARED / "proteins" / "docking_benchmark_5.5.tar.gz") as tar:
        member = tar.extractfile("db5.5/structures/1PPE_l_u.pdb")
        assert member is not None
        with open(HERE / "1PPE_l_u.pdb", "wb") as fh:
            shutil.copyfileobj(member, fh)


if __name__ == "__main__":
    write_qm9()
    write_mp()
    write_oc20()
    write_pdb()
