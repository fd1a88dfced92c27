"""The public test harness ``equiformer.testing`` on real molecules (QM9) and crystals (NaCl, a
triclinic Materials Project structure): a correct e3nn model passes to ~1e-10 in float64, and
each deliberately broken model is caught with a message that names the broken symmetry.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from reference_models import OUTPUT_IRREPS, ReferenceModel
from torch_geometric.data import Batch, Data

from equiformer.data.contract import atomic_number, make_data
from equiformer.testing import (
    assert_equivariant,
    assert_forces_are_gradients,
    assert_periodic_invariant,
    assert_smooth_at_cutoff,
    data_to_structure,
    random_orthogonal,
    random_reflection,
    random_rotation,
)

CUTOFF = 4.0
#: kinds of the reference model's outputs for the periodic checks (sums over atoms are extensive)
KINDS = {
    "energy": "extensive",
    "forces": "per_atom",
    "dipole": "extensive",
    "quadrupole": "extensive",
    "atom_scalars": "per_atom",
    "atom_features": "per_atom",
}


def shared_data() -> Path:
    env = os.environ.get("EQUIFORMER_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ----------------------------------------------------------------------------- real structures


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def qm9() -> list[Data]:
    """Three QM9 molecules (13-19 atoms) read from qm9pack's CSV, positions in Å, float64."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qm9pack is not installed (pip install equiformer[test])")
    csv = Path(spec.submodule_search_locations[0]) / "data" / "qm9_part1.csv"
    table = pd.read_csv(csv, nrows=3000, usecols=["Elements", "XYZ_Ang"])
    mols = []
    for i in (2000, 2500, 2999):
        elements = ast.literal_eval(table.Elements[i])
        xyz = ast.literal_eval(table.XYZ_Ang[i])
        z = [atomic_number(e) for e in elements]
        mols.append(make_data(z, xyz, source=f"qm9_part1.csv row {i}", dtype=torch.float64))
    return mols


def _crystal(structure, source: str) -> Data:
    return make_data(
        np.array(structure.atomic_numbers),
        np.array(structure.cart_coords),
        np.array(structure.lattice.matrix),
        True,
        source=source,
        dtype=torch.float64,
    )


@pytest.fixture(scope="module")
def nacl() -> Data:
    """Rock-salt NaCl, conventional cubic cell (8 atoms, a = 5.64 Å), built by pymatgen."""
    from pymatgen.core import Lattice, Structure

    s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return _crystal(s, "NaCl (Fm-3m)")


@pytest.fixture(scope="module")
def triclinic():
    """The first triclinic structure (<= 6 sites) of the Materials Project file, and the same
    crystal written in a skewed, non-reduced cell (so Niggli/LLL reductions change the cell)."""
    from pymatgen.core import Lattice, Structure
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    path = shared_data() / "materials_project" / "flla_2015.csv"
    if not path.exists():
        pytest.skip(f"{path} not found (set EQUIFORMER_SHARED_DATA)")
    table = pd.read_csv(path, comment="#")
    for row in table.itertuples():
        if row.nsites > 6:
            continue
        s = Structure.from_dict(ast.literal_eval(row.structure))
        angles = np.array(s.lattice.angles)
        if min(np.abs(angles - a).min() for a in (60, 90, 120)) < 2:
            continue
        if SpacegroupAnalyzer(s).get_crystal_system() == "triclinic":
            break
    else:
        pytest.fail("no triclinic structure in flla_2015.csv")
    skew = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1]])
    skewed = Structure(Lattice(skew @ s.lattice.matrix), s.species, s.cart_coords, coords_are_cartesian=True)
    return _crystal(s, row.material_id), _crystal(skewed, f"{row.material_id} (skewed cell)")


@pytest.fixture(scope="module")
def model() -> ReferenceModel:
    return ReferenceModel(cutoff=CUTOFF).double()


def broken(flaw: str) -> ReferenceModel:
    return ReferenceModel(cutoff=CUTOFF, flaw=flaw).double()


# ----------------------------------------------------------------------------- rotations


def test_random_rotations_are_orthogonal_haar_and_seeded():
    gen = torch.Generator().manual_seed(1)
    rots = torch.stack([random_rotation(generator=gen) for _ in range(4000)])
    eye = torch.eye(3, dtype=torch.float64)
    assert rots.dtype == torch.float64
    assert torch.allclose(rots @ rots.transpose(1, 2), eye.expand_as(rots), atol=1e-13)
    assert torch.allclose(torch.linalg.det(rots), torch.ones(4000, dtype=torch.float64), atol=1e-13)
    # Haar moments on SO(3): E[tr R] = 0, E[(tr R)^2] = 1, E[R] = 0, E[R_ab^2] = 1/3
    trace = rots.diagonal(dim1=1, dim2=2).sum(-1)
    assert abs(float(trace.mean())) < 0.07
    assert abs(float((trace**2).mean()) - 1.0) < 0.1
    assert float(rots.mean(0).abs().max()) < 0.05
    assert float(((rots**2).mean(0) - 1 / 3).abs().max()) < 0.03

    refl = torch.stack([random_reflection(generator=gen) for _ in range(50)])
    assert torch.allclose(torch.linalg.det(refl), -torch.ones(50, dtype=torch.float64), atol=1e-13)
    dets = torch.stack([torch.linalg.det(random_orthogonal(generator=gen)) for _ in range(400)])
    assert torch.allclose(dets.abs(), torch.ones(400, dtype=torch.float64), atol=1e-13)
    assert 140 < int((dets > 0).sum()) < 260  # both cosets, about half each

    a = random_rotation(generator=torch.Generator().manual_seed(7))
    b = random_rotation(generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert random_rotation(torch.float32, torch.Generator().manual_seed(7)).dtype == torch.float32


# ----------------------------------------------------------------------------- equivariance


def test_reference_model_is_e3_equivariant_on_qm9(model, qm9):
    batch = Batch.from_data_list(qm9)
    report = assert_equivariant(model, batch, irreps=OUTPUT_IRREPS)
    for transform in ("rotation", "reflection", "translation", "permutation", "combined"):
        for name in OUTPUT_IRREPS:
            assert report[f"{transform}/{name}"] < 1e-11, (transform, name, report)
    # a single Data works too
    assert max(assert_equivariant(model, qm9[0], irreps=OUTPUT_IRREPS, n_trials=1).values()) < 1e-11


def test_reference_model_is_equivariant_on_mixed_batch_of_crystals_and_molecule(model, nacl, triclinic, qm9):
    """Cells rotate with the atoms; per-atom permutation stays inside each graph."""
    batch = Batch.from_data_list([nacl, triclinic[0], qm9[1]])
    report = assert_equivariant(model, batch, irreps=OUTPUT_IRREPS, n_trials=1)
    assert max(report.values()) < 1e-10


def test_float32_model_passes_float32_defaults_and_dtype_casts_a_copy(qm9):
    model32 = ReferenceModel(cutoff=CUTOFF)
    batch32 = Batch.from_data_list([make_data(d.z, d.pos, dtype=torch.float32) for d in qm9])
    report32 = assert_equivariant(model32, batch32, irreps=OUTPUT_IRREPS, n_trials=1)
    assert 1e-9 < max(report32.values()) < 1e-5  # float32 round-off: visible, within tolerance
    report64 = assert_equivariant(model32, batch32, irreps=OUTPUT_IRREPS, n_trials=1, dtype=torch.float64)
    assert max(report64.values()) < 1e-11
    assert next(model32.parameters()).dtype == torch.float32  # the caller's model is untouched
    assert model32.training  # ... and its mode restored


def test_rotating_outputs_need_their_irreps(model, qm9):
    """Declaring the wrong irreps is caught: a '1o' dipole declared '1e' fails under reflection only."""
    with pytest.raises(AssertionError, match=r"failed: reflection \['dipole'\]"):
        assert_equivariant(model, qm9[0], irreps={"dipole": "1e"}, n_trials=1)
    with pytest.raises(AssertionError, match=r"failed: rotation \['quadrupole'\]"):
        assert_equivariant(model, qm9[0], irreps={"quadrupole": "1o+2x0e"}, n_trials=1)


def test_raw_coordinate_feature_is_caught_by_rotation(qm9):
    with pytest.raises(AssertionError, match=r"failed: rotation \['energy'") as info:
        assert_equivariant(broken("raw_x"), Batch.from_data_list(qm9), irreps=OUTPUT_IRREPS)
    message = str(info.value)
    assert "raw coordinates" in message and "R = [[" in message and "(det +1)" in message
    assert "max error" in message and "tolerance" in message


def test_pseudovector_is_caught_only_with_reflections(qm9):
    batch = Batch.from_data_list(qm9)
    with pytest.raises(AssertionError, match=r"failed: reflection \['dipole'\]") as info:
        assert_equivariant(broken("pseudovector"), batch, irreps=OUTPUT_IRREPS)
    message = str(info.value)
    assert "failed: rotation" not in message
    assert "pseudovector" in message and "(det -1)" in message
    # an SE(3) test cannot see it, and declaring the truth ("1e") makes it E(3)-equivariant
    assert_equivariant(broken("pseudovector"), batch, irreps=OUTPUT_IRREPS, parity="SE(3)")
    assert_equivariant(broken("pseudovector"), batch, irreps={**OUTPUT_IRREPS, "dipole": "1e"})


def test_absolute_positions_are_caught_by_translation(qm9):
    with pytest.raises(AssertionError, match=r"failed: translation \[") as info:
        assert_equivariant(broken("absolute_pos"), Batch.from_data_list(qm9), irreps=OUTPUT_IRREPS)
    message = str(info.value)
    assert "failed: rotation" not in message and "absolute positions" in message
    assert "translation t = [" in message


def test_atom_order_dependence_is_caught_by_permutation(qm9):
    with pytest.raises(AssertionError, match=r"failed: permutation \[") as info:
        assert_equivariant(broken("atom_order"), Batch.from_data_list(qm9), irreps=OUTPUT_IRREPS)
    message = str(info.value)
    assert "order of atoms" in message or "atom order" in message
    assert "perm = [" in message and "failed: rotation" not in message


class _TaggedModel(torch.nn.Module):
    """Reads a per-atom input field ``tags``: correct only if the harness permutes it with the atoms."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, data):
        out = dict(self.inner(data))
        out["atom_scalars"] = out["atom_scalars"] + data.tags[:, None]
        return out


def test_every_per_node_field_is_permuted(model, qm9):
    tagged = []
    for d in qm9:
        d = copy.copy(d)
        d.tags = torch.linspace(0.0, 1.0, d.num_nodes, dtype=torch.float64)
        tagged.append(d)
    report = assert_equivariant(_TaggedModel(model), Batch.from_data_list(tagged), irreps=OUTPUT_IRREPS, n_trials=1)
    assert report["permutation/atom_scalars"] < 1e-12


def test_equivariance_usage_errors_are_clear(model, qm9):
    with pytest.raises(ValueError, match=r"no output named \['charges'\]"):
        assert_equivariant(model, qm9[0], outputs=["charges"])
    with pytest.raises(ValueError, match=r"no irreps declared for outputs \['dipole'"):
        assert_equivariant(model, qm9[0])
    with pytest.raises(ValueError, match=r"'quadrupole' has shape \(1, 5\)"):
        assert_equivariant(model, qm9[0], irreps={"quadrupole": "1o"})


# ----------------------------------------------------------------------------- forces


def test_reference_forces_are_gradients(model, qm9, triclinic):
    report = assert_forces_are_gradients(model, qm9[0], n_atoms_checked=3)
    assert report["max_force"] > 1e-3 and report["max_error"] < 1e-6
    report = assert_forces_are_gradients(model, triclinic[1], n_atoms_checked=3)
    assert report["max_force"] > 1e-3 and report["max_error"] < 1e-6


def test_symmetric_structure_warns_that_the_force_check_is_weak(model, nacl):
    with pytest.warns(UserWarning, match="every checked force is ~0"):
        assert_forces_are_gradients(model, nacl, n_atoms_checked=2)


@pytest.mark.parametrize(
    "flaw, diagnosis",
    [("force_sign", r"the sign is flipped"), ("force_scale", r"forces = 0\.5 x \(-dE/dpos\)")],
)
def test_wrong_forces_are_caught_and_diagnosed(qm9, flaw, diagnosis):
    bad = broken(flaw)
    # these forces are still perfectly equivariant: only the gradient check can see them
    assert_equivariant(bad, qm9[0], irreps=OUTPUT_IRREPS, n_trials=1)
    with pytest.raises(AssertionError, match=diagnosis) as info:
        assert_forces_are_gradients(bad, qm9[0], n_atoms_checked=3)
    assert "is not -denergy/dpos" in str(info.value) and "numerical" in str(info.value)


# ----------------------------------------------------------------------------- periodic


def test_reference_model_is_periodic_invariant(model, nacl, triclinic):
    from pymatgen.core import Structure  # noqa: F401  (pymatgen builds every transformed cell)

    skewed = triclinic[1]
    reduced = data_to_structure(skewed).get_reduced_structure("niggli")
    assert not np.allclose(reduced.lattice.matrix, skewed.cell[0].numpy())  # the reduction is not a no-op
    report = assert_periodic_invariant(model, Batch.from_data_list([nacl, skewed]), KINDS)  # one at a time
    checks = {key.split("/")[0] for key in report}
    assert checks == {"supercell", "niggli", "lll", "unimodular", "wrap", "translate"}
    assert set(report) == {f"{c}/{name}" for c in checks for name in KINDS}
    assert max(report.values()) < 1e-10


def test_ignoring_periodic_images_is_caught(triclinic):
    bad = broken("no_pbc")
    assert_equivariant(bad, triclinic[1], irreps=OUTPUT_IRREPS, n_trials=1)  # still E(3)-equivariant
    with pytest.raises(AssertionError, match=r"failed checks: supercell, niggli, lll, unimodular, wrap\n") as info:
        assert_periodic_invariant(bad, triclinic[1], KINDS)
    message = str(info.value)
    assert "translate" not in message.splitlines()[1]  # a rigid translation keeps its distances
    assert "periodic images" in message and "2x1x1 supercell" in message and "copy of input atom" in message


def test_misdeclared_extensive_output_is_named(model, nacl):
    with pytest.raises(AssertionError, match=r"scales with the number of cells \(2\): declare it extensive"):
        assert_periodic_invariant(model, nacl, {"energy": "intensive"}, checks=("supercell",))


def test_periodic_usage_errors_are_clear(model, qm9, nacl):
    with pytest.raises(ValueError, match=r"not periodic"):
        assert_periodic_invariant(model, qm9[0])
    with pytest.raises(ValueError, match=r"unknown periodic check 'rotate'"):
        assert_periodic_invariant(model, nacl, checks=("rotate",))


# ----------------------------------------------------------------------------- smoothness


def test_energy_and_forces_are_smooth_at_the_cutoff(model, qm9):
    report = assert_smooth_at_cutoff(model, qm9[0], cutoff=CUTOFF, pair=(0, 1))
    assert report["energy_step"] > 0  # the moved pair does interact near the cutoff
    with pytest.raises(AssertionError, match=r"'energy' jumps by .* cross the cutoff"):
        assert_smooth_at_cutoff(broken("hard_cutoff"), qm9[0], cutoff=CUTOFF, pair=(0, 1))


# ----------------------------------------------------------------------------- more output and input types


class _ExtrasModel(torch.nn.Module):
    """Adds a rank-2 Cartesian output (dipole dipole^T + dipole_field^T, a true tensor) and an energy
    term -dipole . efield that couples to a per-graph input vector field ``efield``."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, data):
        out = dict(self.inner(data))
        mu, field = out["dipole"], data.efield
        out["polarization"] = mu[:, :, None] * mu[:, None, :] + mu[:, :, None] * field[:, None, :]
        out["energy"] = out["energy"] - (mu * field).sum(-1)
        return out


def test_cartesian_tensor_outputs_and_rotated_input_fields(model, qm9):
    datas = []
    for k, d in enumerate(qm9):
        d = copy.copy(d)
        d.efield = torch.tensor([[0.1 * k, -0.2, 0.3]], dtype=torch.float64)  # [1, 3] per graph, V/Å
        datas.append(d)
    batch = Batch.from_data_list(datas)
    extras = _ExtrasModel(model)
    irreps = {"energy": "0e", "polarization": "cartesian", "dipole": "1o"}
    report = assert_equivariant(extras, batch, irreps=irreps, input_irreps={"efield": "1o"}, n_trials=1)
    assert report["rotation/polarization"] < 1e-12 and report["reflection/energy"] < 1e-12
    # without telling the harness that efield is a vector, the field stays fixed in space: caught
    with pytest.raises(AssertionError, match=r"failed: rotation \['energy', 'polarization'\]"):
        assert_equivariant(extras, batch, irreps=irreps, n_trials=1)


class _RoundedModel(torch.nn.Module):
    """A float64 model that multiplies its dipole by Q^T Q with Q orthogonal rounded to float32:
    the identity up to ~1e-8, like constants built in float32 and cast to float64."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        q = random_rotation(generator=torch.Generator().manual_seed(3)).to(torch.float32).to(torch.float64)
        self.register_buffer("m", q.T @ q)

    def forward(self, data):
        out = dict(self.inner(data))
        out["dipole"] = out["dipole"] @ self.m
        return out


def test_round_off_from_float32_constants_is_diagnosed_as_precision(model, qm9):
    with pytest.raises(AssertionError, match=r"precision: every error is tiny") as info:
        assert_equivariant(_RoundedModel(model), qm9[0], irreps={"dipole": "1o"}, n_trials=1, parity=False)
    assert "failed: rotation ['dipole']" in str(info.value)
