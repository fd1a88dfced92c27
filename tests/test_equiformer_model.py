"""Equiformer on real QM9 molecules (qm9pack's CSV): E(3)/SE(3) invariance, translation and
permutation invariance in float64, forces = -dE/dx, smooth cutoff, periodic crystals, config
round trip, the paper's configuration."""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch_geometric.data import Batch, Data

from equiformer.data.contract import atomic_number, make_data
from equiformer.models import MODEL_REGISTRY, build_model
from equiformer.models.equiformer import PRESETS, Equiformer
from equiformer.testing import (
    assert_equivariant,
    assert_forces_are_gradients,
    assert_periodic_invariant,
    assert_smooth_at_cutoff,
    random_reflection,
)

F64 = torch.float64


def qm9_csv() -> Path:
    """qm9pack's first CSV, located without importing the package."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qm9pack is not installed")
    return Path(spec.submodule_search_locations[0]) / "data" / "qm9_part1.csv"


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def molecules() -> list[Data]:
    """Six real QM9 molecules of 12-19 atoms (float64)."""
    table = pd.read_csv(qm9_csv(), nrows=400, usecols=["Index", "Elements", "XYZ_Ang"])
    table = table[table["Elements"].map(lambda s: 12 <= len(ast.literal_eval(s)) <= 19)]
    out = []
    for index, elements, xyz in table.head(6).itertuples(index=False):
        z = torch.tensor([atomic_number(s) for s in ast.literal_eval(elements)])
        pos = torch.tensor(json.loads(xyz), dtype=F64)
        out.append(make_data(z, pos, source=f"qm9 #{index}", dtype=F64))
    assert len(out) == 6
    return out


def small_model(preset: str = "small_e3", **kwargs) -> Equiformer:
    """The CPU preset, two blocks deep to keep the tests fast."""
    torch.manual_seed(0)
    return build_model("equiformer", preset=preset, num_layers=2, **kwargs).double().eval()


def transformed(mols: list[Data], R: torch.Tensor, shift: torch.Tensor, seed: int = 0) -> Batch:
    """Each molecule rotated by R, translated by shift and its atoms permuted."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for mol in mols:
        perm = torch.randperm(mol.num_nodes, generator=gen)
        out.append(make_data(mol.z[perm], (mol.pos @ R.T + shift)[perm], dtype=F64))
    return Batch.from_data_list(out)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------- the paper's model


def test_paper_qm9_configuration():
    model = build_model("equiformer")
    cfg = model.config
    assert cfg["num_layers"] == 6 and cfg["irreps_node"] == "128x0e+64x1e+32x2e" and cfg["lmax"] == 2
    assert cfg["num_heads"] == 4 and cfg["irreps_head"] == "32x0e+16x1e+8x2e"  # 4 heads x 32 scalars = 128
    assert cfg["irreps_mlp_mid"] == "384x0e+192x1e+96x2e" and cfg["irreps_feature"] == "512x0e"
    assert cfg["cutoff"] == 5.0 and cfg["num_basis"] == 128 and cfg["radial_hidden"] == [64, 64]
    assert cfg["attention"] == "mlp" and cfg["nonlinear_message"] and cfg["alpha_drop"] == 0.2
    n_params = sum(p.numel() for p in model.parameters())
    assert 3.3e6 < n_params < 3.6e6, n_params  # the paper's QM9 model: ~3.5M
    assert str(model.irreps_sh) == "1x0e+1x1e+1x2e"  # SE(3), as the paper's QM9 runs
    json.dumps(cfg)


def test_config_round_trip_rebuilds_the_same_model(molecules):
    model = small_model(attention="dot_product", num_targets=3, target_mean=[1.0, 2.0, 3.0], target_std=0.5)
    config = json.loads(json.dumps(model.config))
    clone = build_model("equiformer", **config).double().eval()
    clone.load_state_dict(model.state_dict(), strict=True)
    batch = Batch.from_data_list(molecules[:3])
    out, out_clone = model(batch)["y"], clone(batch)["y"]
    assert out.shape == (3, 3)
    torch.testing.assert_close(out, out_clone, rtol=0, atol=0)
    assert set(MODEL_REGISTRY) >= {"equiformer", "equiformer_small"}
    assert build_model("equiformer_small").config["irreps_node"] == PRESETS["small"]["irreps_node"]


def test_e3nn_reference_backend_gives_the_same_model(molecules):
    model = small_model("small_e3")
    reference = build_model("equiformer", **{**model.config, "tp_backend": "e3nn"}).double().eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    batch = Batch.from_data_list(molecules[:3])
    torch.testing.assert_close(model(batch)["y"], reference(batch)["y"], rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------- symmetries


@pytest.mark.parametrize("attention", ["mlp", "dot_product"])
def test_e3_model_invariant_under_rotation_reflection_translation_permutation(molecules, attention):
    model = small_model("small_e3", attention=attention, nonlinear_message=attention == "mlp", predict_forces=True)
    batch = Batch.from_data_list(molecules)
    # y and energy invariant, forces rotate as 1o; float64 tolerance 1e-10 (+ 1e-10 relative)
    assert_equivariant(model, batch, parity=True)
    # the same check written out: rotation + reflection + translation + per-molecule permutation
    ref = model(batch)["y"]
    shift = torch.tensor([2.0, -1.0, 0.5], dtype=F64)
    reflection = random_reflection(dtype=F64, generator=torch.Generator().manual_seed(2))
    y = model(transformed(molecules, reflection, shift, seed=2))["y"]
    assert rel_err(y, ref) < 1e-10


def test_se3_model_invariant_under_rotation_but_sees_chirality(molecules):
    model = small_model("small")  # the paper's SE(3) irreps, harmonics 1x0e+1x1e+1x2e
    batch = Batch.from_data_list(molecules)
    assert_equivariant(model, batch, parity="SE(3)")
    # a mirror image is another molecule to an SE(3) model (enantiomers differ)
    ref = model(batch)["y"]
    mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=F64))
    assert rel_err(model(transformed(molecules, mirror, torch.zeros(3, dtype=F64)))["y"], ref) > 1e-9


def test_float32_build_cast_to_float64_is_exactly_equivariant(molecules):
    """e3nn derives Clebsch-Gordan tables in the default dtype: casting must restore float64 ones."""
    torch.manual_seed(0)
    model = build_model("equiformer", preset="small_e3", num_layers=2)  # float32
    assert_equivariant(model, Batch.from_data_list(molecules[:3]), dtype=F64, permutation=False)


def test_float32_agrees_with_float64(molecules):
    model64 = small_model("small_e3")
    model32 = copy.deepcopy(model64).float()
    batch64 = Batch.from_data_list(molecules)
    batch32 = copy.copy(batch64)
    batch32.pos, batch32.cell = batch64.pos.float(), batch64.cell.float()
    y32 = model32(batch32)["y"]
    assert y32.dtype == torch.float32
    assert rel_err(y32.double(), model64(batch64)["y"]) < 1e-4
    assert_equivariant(model32, batch32, parity=True)  # float32 tolerance 1e-5


# ---------------------------------------------------------------------------------------- forces


def test_forces_are_minus_energy_gradient(molecules):
    model = small_model("small_e3", predict_forces=True)
    mol = molecules[0]
    out = model(mol)
    assert out["energy"].shape == (1,) and out["forces"].shape == (mol.num_nodes, 3)
    torch.testing.assert_close(out["energy"], out["y"][:, 0])
    assert float(out["forces"].sum(0).abs().max()) < 1e-12  # translation invariance: no net force
    assert_forces_are_gradients(model, Batch.from_data_list(molecules[:2]), n_atoms_checked=4)
    assert not mol.pos.requires_grad  # the caller's data is untouched


def test_training_forces_carry_a_graph_and_every_parameter_learns(molecules):
    # SE(3) irreps: the embeddings populate every irrep (0e, 1e, 2e), so no weight may be dead
    # (with E(3) irreps, 0o/1e/2o stay zero until the first attention and its merge weights idle)
    model = small_model("small", predict_forces=True, attention="mlp").train()
    out = model(Batch.from_data_list(molecules[:2]))
    assert out["forces"].requires_grad
    loss = out["energy"].pow(2).sum() + out["forces"].pow(2).sum()
    loss.backward()
    dead = {n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().max() > 0)}
    # by construction (as in the paper) the last block's l > 0 outputs never reach its scalar output
    last = f"blocks.{len(model.blocks) - 1}."
    assert all(n.startswith(last) and n.endswith(("weights.1", "weights.2")) for n in dead), dead
    assert f"{last}attn.proj.weights.0" not in dead and f"{last}ffn.lin2.weights.0" not in dead
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_energy_and_forces_smooth_when_an_atom_crosses_the_cutoff():
    """Atom 2 leaves atom 0's cutoff (5 Å) but keeps a neighbour (atom 1, 3.8 Å away)."""
    pos = torch.tensor([[0.0, 0, 0], [1.2, 0, 0], [4.0, 0.1, 0]], dtype=F64)
    mol = make_data(torch.tensor([6, 8, 1]), pos, dtype=F64)
    smooth = small_model("small_e3", predict_forces=True)
    assert_smooth_at_cutoff(smooth, mol, cutoff=5.0, pair=(0, 2))
    # written out: across the cutoff E changes by the force times the step, forces do not jump
    h = 1e-6
    cutoff = (5.0**2 - 0.1**2) ** 0.5  # x at which |r_02| = 5 Å

    def run(model, x):
        moved = copy.copy(mol)
        moved.pos = pos.clone()
        moved.pos[2, 0] = x
        out = model(moved)
        return float(out["energy"]), out["forces"]

    (e0, f0), (e1, f1) = run(smooth, cutoff - h), run(smooth, cutoff + h)
    assert abs((e1 - e0) + float(f0[2, 0]) * 2 * h) < 1e-9
    assert float((f1 - f0).abs().max()) < 1e-6
    hard = small_model("small_e3", predict_forces=True, envelope=None)  # the paper's hard cutoff jumps
    (e0, _), (e1, _) = run(hard, cutoff - h), run(hard, cutoff + h)
    assert abs(e1 - e0) > 1e-4
    with pytest.raises(AssertionError):
        assert_smooth_at_cutoff(hard, mol, cutoff=5.0, pair=(0, 2))


# ------------------------------------------------------------------------------------- crystals


def test_periodic_crystal_invariances():
    """Silicon: supercells, other unit cells, wrapped atoms and translations give the same crystal."""
    from ase.build import bulk

    unit = bulk("Si", "diamond", a=5.43)
    crystal = make_data(unit.numbers, unit.positions, cell=unit.cell.array, pbc=unit.pbc, dtype=F64)
    summed = small_model("small_e3", num_targets=2)  # sum readout: extensive
    assert_periodic_invariant(summed, crystal, extensive=["y"], supercells=[(2, 1, 1)])
    mean = small_model("small_e3", readout="mean")  # mean readout: intensive
    assert_periodic_invariant(mean, crystal, intensive=["y"], supercells=[(1, 2, 1)], checks=("supercell", "wrap"))


# ------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs_give_clear_errors(molecules):
    model = small_model("small")
    no_pos = Data(z=molecules[0].z)
    with pytest.raises(ValueError, match="'pos'"):
        model(no_pos)
    bad_z = copy.copy(molecules[0])
    bad_z.z = bad_z.z.clone()
    bad_z.z[0] = 200
    with pytest.raises(ValueError, match="atomic numbers"):
        model(bad_z)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("equiformer_v9")
    with pytest.raises(ValueError, match="preset"):
        build_model("equiformer", preset="huge")
    with pytest.raises(ValueError, match="not canonical"):
        build_model("equiformer", preset="small", irreps_node="8x1e+16x0e")
    with pytest.raises(ValueError, match="attention"):
        build_model("equiformer", preset="small", attention="linear")
