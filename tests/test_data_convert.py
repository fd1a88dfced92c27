"""Converters ASE / pymatgen / RDKit <-> data contract, checked against independent readings."""

from __future__ import annotations

import ast
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from equiformer.data import (
    StructureError,
    from_ase,
    from_pymatgen,
    from_rdkit,
    from_smiles,
    read,
    to_ase,
    to_pymatgen,
    to_rdkit,
)

FILES = Path(__file__).resolve().parent / "files"
SHARED = Path(os.environ.get("EQUIFORMER_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _mp_structures(ids: tuple[str, ...]):
    import pandas as pd
    from pymatgen.core import Structure

    path = SHARED / "materials_project" / "flla_2015.csv"
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    df = pd.read_csv(path, comment="#")
    rows = df[df["material_id"].isin(ids)]
    return {r.material_id: Structure.from_dict(ast.literal_eval(r.structure)) for r in rows.itertuples()}


def _oc20_frames():
    import ase.io

    return ase.io.read(FILES / "oc20_random1000156_first2.traj", index=":")


# ---------------------------------------------------------------------------------- ASE


def test_from_ase_reads_a_real_oc20_frame_with_calculator_and_constraint():
    atoms = _oc20_frames()[0]
    data = from_ase(atoms, dtype=F64)
    assert data.z.tolist() == atoms.numbers.tolist()
    assert torch.equal(data.pos, torch.from_numpy(atoms.positions))
    assert torch.equal(data.cell[0], torch.from_numpy(atoms.cell.array))
    assert data.pbc.tolist() == [atoms.pbc.tolist()]
    assert data.energy.item() == atoms.get_potential_energy()
    # the stored (DFT) forces, not ASE's constrained ones that are zero on fixed atoms
    assert torch.equal(data.forces, torch.from_numpy(atoms.get_forces(apply_constraint=False)))
    fixed_idx = atoms.constraints[0].get_indices()
    assert torch.nonzero(data.fixed).view(-1).tolist() == sorted(fixed_idx.tolist())
    assert data.source == "ase.Atoms HNa36Tl12"
    assert data.pos.dtype == F64 and data.z.dtype == torch.long


def test_from_ase_properties_false_and_default_dtype():
    atoms = _oc20_frames()[1]
    data = from_ase(atoms, properties=False)
    assert "energy" not in data and "forces" not in data
    assert data.pos.dtype == torch.get_default_dtype()
    np.testing.assert_allclose(data.pos.numpy(), atoms.positions, rtol=1e-6, atol=1e-5)


def test_ase_round_trip_is_exact():
    from ase.build import bulk, fcc111, molecule
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms

    slab = fcc111("Pt", (2, 2, 3), vacuum=6.0)
    slab.set_tags(np.arange(len(slab)) % 3)
    slab.set_constraint(FixAtoms(indices=[0, 1, 2, 3]))
    rng = np.random.default_rng(0)
    slab.calc = SinglePointCalculator(slab, energy=-71.25, forces=rng.normal(size=(len(slab), 3)))
    crystal = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    crystal.rattle(0.02, seed=1)
    cases = [molecule("CH3CH2OH"), crystal, slab, *_oc20_frames()]
    for atoms in cases:
        back = to_ase(from_ase(atoms, dtype=F64))
        assert back.numbers.tolist() == atoms.numbers.tolist()
        assert np.array_equal(back.positions, atoms.positions)
        assert np.array_equal(back.cell.array, atoms.cell.array)
        assert back.pbc.tolist() == atoms.pbc.tolist()
        if atoms.has("tags"):
            assert back.get_tags().tolist() == atoms.get_tags().tolist()
        if atoms.constraints:
            assert sorted(back.constraints[0].get_indices()) == sorted(atoms.constraints[0].get_indices())
        if atoms.calc is not None:
            assert back.get_potential_energy() == atoms.get_potential_energy()
            assert np.array_equal(back.get_forces(apply_constraint=False), atoms.get_forces(apply_constraint=False))
        else:
            assert back.calc is None


def test_data_round_trip_through_ase_is_exact():
    data = from_ase(_oc20_frames()[0], dtype=F64)
    again = from_ase(to_ase(data), dtype=F64)
    for key in ("z", "pos", "cell", "pbc", "energy", "forces", "fixed"):
        assert torch.equal(data[key], again[key]), key


def test_from_ase_validation_names_the_source():
    from ase import Atoms

    with pytest.raises(StructureError, match=r"^ase.Atoms H2: atoms 0 and 1 overlap"):
        from_ase(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.05]]))
    with pytest.raises(StructureError, match=r"^water: atom 1 has non-finite coordinates"):
        from_ase(Atoms("OH2", positions=[[0, 0, 0], [0, np.nan, 0.9], [0.9, 0, 0]]), source="water")
    with pytest.raises(StructureError, match="empty structure"):
        from_ase(Atoms())
    with pytest.raises(TypeError, match="expects an ase.Atoms"):
        from_ase("CCO")


def test_to_ase_rejects_a_batch():
    from torch_geometric.data import Batch

    d = from_smiles("O")
    with pytest.raises(ValueError, match="batch of 2"):
        to_ase(Batch.from_data_list([d, d]))


# ----------------------------------------------------------------------------- pymatgen


def test_from_pymatgen_matches_ase_adaptor_on_real_mp_crystals():
    from pymatgen.io.ase import AseAtomsAdaptor

    structures = _mp_structures(("mp-390", "mp-10", "mp-10000", "mp-10062"))
    assert len(structures) == 4
    for mid, s in structures.items():
        data = from_pymatgen(s, dtype=F64)
        ref = from_ase(AseAtomsAdaptor.get_atoms(s), dtype=F64, properties=False)
        assert data.z.tolist() == ref.z.tolist(), mid
        torch.testing.assert_close(data.pos, ref.pos, rtol=0, atol=1e-12)
        torch.testing.assert_close(data.cell, ref.cell, rtol=0, atol=1e-12)
        assert data.pbc.all()
        assert data.source.startswith("pymatgen Structure ")
        assert "forces" not in data  # MP's placeholder site forces are not read


def test_pymatgen_round_trip_structure_and_molecule():
    from pymatgen.core import Molecule

    s = _mp_structures(("mp-390",))["mp-390"]
    back = to_pymatgen(from_pymatgen(s, dtype=F64))
    assert np.array_equal(back.lattice.matrix, s.lattice.matrix)
    assert np.allclose(back.cart_coords, s.cart_coords, atol=1e-12, rtol=0)
    assert [sp.symbol for sp in back.species] == [sp.symbol for sp in s.species]

    mol = Molecule(["C", "O", "H", "H"], [[0, 0, 0], [0, 0, 1.21], [0, 0.94, -0.59], [0, -0.94, -0.59]])
    data = from_pymatgen(mol, dtype=F64)
    assert not data.pbc.any() and torch.count_nonzero(data.cell) == 0
    back = to_pymatgen(data)
    assert type(back).__name__ == "Molecule"
    assert np.array_equal(back.cart_coords, mol.cart_coords)


def test_to_pymatgen_keeps_slab_pbc_and_fixed():
    data = from_ase(_oc20_frames()[0], dtype=F64)
    data.pbc = torch.tensor([[True, True, False]])
    s = to_pymatgen(data)
    assert tuple(s.lattice.pbc) == (True, True, False)
    again = from_pymatgen(s, dtype=F64)
    assert again.pbc.tolist() == [[True, True, False]]
    assert torch.equal(again.fixed, data.fixed)
    torch.testing.assert_close(again.pos, data.pos, rtol=0, atol=1e-10)


def test_from_pymatgen_rejects_partial_occupancy_and_accepts_ions():
    from pymatgen.core import Lattice, Structure

    disordered = Structure(Lattice.cubic(5.64), [{"Na": 0.5, "K": 0.5}, "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    with pytest.raises(StructureError) as exc:
        from_pymatgen(disordered, source="NaCl")
    assert str(exc.value) == "NaCl: partial occupancies are not supported (site 0: Na:0.5, K:0.5)"
    ionic = Structure(Lattice.cubic(4.2), ["Fe2+", "O2-"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert from_pymatgen(ionic).z.tolist() == [26, 8]


# -------------------------------------------------------------------------------- RDKit


def test_from_smiles_is_seeded_and_chemically_sensible():
    a = from_smiles("CCO", seed=0)
    b = from_smiles("CCO", seed=0)
    assert torch.equal(a.pos, b.pos)
    assert sorted(a.z.tolist()) == sorted([6, 6, 8] + [1] * 6)
    assert a.source == "CCO" and a.smiles == "CCO"
    # MMFF94 geometry: C-C and C-O single bonds near their textbook lengths
    pos = a.pos.double()
    heavy = [i for i, zi in enumerate(a.z.tolist()) if zi > 1]
    d = torch.cdist(pos[heavy], pos[heavy])
    cc = d[0, 1].item()
    co = d[1, 2].item()
    assert 1.48 < cc < 1.55 and 1.39 < co < 1.46, (cc, co)
    c = from_smiles("CCO", seed=2)  # (RDKit's random number generator treats seeds 0 and 1 alike)
    assert not torch.equal(a.pos, c.pos)


@pytest.mark.parametrize(
    ("smiles", "reason"),
    [
        ("C1CC", "unclosed ring"),
        ("N(C)(C)(C)(C)C", "Explicit valence for atom # 0 N, 5, is greater than permitted"),
        ("C(C", "extra open parentheses"),
        ("", "empty"),
    ],
)
def test_from_smiles_invalid(smiles, reason):
    with pytest.raises(StructureError) as exc:
        from_smiles(smiles)
    msg = str(exc.value)
    assert msg.startswith(f"invalid SMILES {smiles!r}: ")
    assert reason in msg
    assert "\n" not in msg


def test_from_rdkit_requires_a_3d_conformer_and_keeps_hydrogens_as_given():
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.MolFromSmiles("c1ccccc1O")
    with pytest.raises(StructureError, match="no 3D conformer"):
        from_rdkit(mol)
    AllChem.Compute2DCoords(mol)
    with pytest.raises(StructureError, match="2D coordinates only"):
        from_rdkit(mol)
    molh = Chem.AddHs(mol)
    assert AllChem.EmbedMolecule(molh, randomSeed=3) == 0
    data = from_rdkit(molh, dtype=F64)
    assert data.z.tolist() == [a.GetAtomicNum() for a in molh.GetAtoms()]
    assert np.array_equal(data.pos.numpy(), molh.GetConformer().GetPositions())
    assert data.smiles == "Oc1ccccc1"
    heavy = Chem.RemoveHs(molh)
    with pytest.warns(UserWarning, match="6 implicit hydrogens"):
        d2 = from_rdkit(heavy)
    assert d2.z.tolist() == [6] * 6 + [8]
    with pytest.raises(StructureError, match="got None"):
        from_rdkit(None)


def test_from_rdkit_matches_ase_reading_the_same_sdf():
    import io

    import ase.io
    from rdkit import Chem

    supplier = Chem.SDMolSupplier(str(FILES / "qm9_3.sdf"), removeHs=False)
    blocks = [b for b in (FILES / "qm9_3.sdf").read_text().split("$$$$\n") if b.strip()]
    ase_frames = [ase.io.read(io.StringIO(b), format="sdf") for b in blocks]  # ASE reads one record
    mols = list(supplier)
    assert len(mols) == len(ase_frames) == 3
    for mol, atoms in zip(mols, ase_frames):
        data = from_rdkit(mol, dtype=F64)
        assert data.name == mol.GetProp("_Name")
        assert data.z.tolist() == atoms.numbers.tolist()
        np.testing.assert_allclose(data.pos.numpy(), atoms.positions, atol=1e-12)


def test_to_rdkit_perceives_bonds_of_a_real_qm9_molecule():
    from rdkit import Chem

    for data in read(FILES / "qm9_3.xyz", dtype=F64):
        mol = to_rdkit(data)
        qm9_smiles = data.name.split()[-1]
        assert Chem.MolToSmiles(Chem.RemoveHs(mol)) == Chem.CanonSmiles(qm9_smiles)
        assert np.array_equal(mol.GetConformer().GetPositions(), data.pos.numpy())
    with pytest.raises(ValueError, match="periodic"):
        to_rdkit(read(FILES / "TiO2_mp-390.cif")[0])


def test_from_rdkit_rejects_dummy_atoms():
    from rdkit import Chem
    from rdkit.Chem import AllChem

    with pytest.raises(StructureError, match="dummy atoms"):
        from_smiles("*CC")
    mol = Chem.AddHs(Chem.MolFromSmiles("*CC"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AllChem.EmbedMolecule(mol, randomSeed=0)
    if mol.GetNumConformers():
        with pytest.raises(StructureError, match="atom 0 is a dummy atom"):
            from_rdkit(mol, source="star")
