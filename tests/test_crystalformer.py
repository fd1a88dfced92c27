"""Crystalformer (Taniai et al., ICLR 2024): infinitely connected attention checked against
analytic and brute-force lattice sums, convergence of the truncated sums, exact periodic
invariance (supercells, reduced and skewed cells, wrapping, translation) and E(3)/permutation
invariance in float64 on real crystals, the paper's parameter count, and a training smoke run
on Materials Project structures."""

from __future__ import annotations

import ast
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch_geometric.data import Batch

from equiformer.data.contract import make_data
from equiformer.models.crystalformer import PRESETS, Crystalformer
from equiformer.nn.periodic_attention import (
    PeriodicGaussianAttention,
    distance_basis,
    gaussian_lattice_sums,
    lattice_terms,
)
from equiformer.testing import assert_equivariant, assert_periodic_invariant

F64 = torch.float64
MATERIAL_IDS = {
    "triclinic": "mp-626708",  # CoO2H2, P-1, 5 atoms, angles 80.6/92.6/124.2
    "skewed": "mp-632286",  # Sb, P-1 with a 160 degree angle between its cell vectors
}


pytestmark = pytest.mark.usefixtures("one_thread")


def shared_data() -> Path:
    env = os.environ.get("EQUIFORMER_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def mp_table() -> pd.DataFrame:
    path = shared_data() / "materials_project" / "flla_2015.csv"
    if not path.exists():
        pytest.skip(f"Materials Project sample not found at {path} (set EQUIFORMER_SHARED_DATA)")
    return pd.read_csv(path, comment="#")


def to_data(structure, y: float | None = None, dtype=torch.float32):
    return make_data(structure.atomic_numbers, structure.cart_coords, cell=structure.lattice.matrix,
                     pbc=[True, True, True], y=None if y is None else [[y]], dtype=dtype)


def mp_structure(table: pd.DataFrame, material_id: str):
    from pymatgen.core import Structure

    row = table[table.material_id == material_id].iloc[0]
    return Structure.from_dict(ast.literal_eval(row.structure))


def nacl():
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def srtio3():
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice.cubic(3.905), ["Sr", "Ti", "O", "O", "O"],
                     [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


@pytest.fixture(scope="module")
def mp_crystals(mp_table):
    """Four small real crystals: rock salt, perovskite, a triclinic and a strongly skewed MP cell."""
    return [to_data(nacl().get_primitive_structure()), to_data(srtio3()),
            to_data(mp_structure(mp_table, MATERIAL_IDS["triclinic"])),
            to_data(mp_structure(mp_table, MATERIAL_IDS["skewed"]))]


@pytest.fixture(scope="module")
def calibrated_model(mp_crystals):
    """The paper's architecture (small width for speed), sigma statistics set on real crystals."""
    torch.manual_seed(0)
    model = Crystalformer(preset="small", num_targets=2)
    return model.calibrate(Batch.from_data_list(mp_crystals)).eval()


class WithAtomFeatures(nn.Module):
    """``y`` and the per-atom features ``h`` of a Crystalformer (for the per-atom checks)."""

    def __init__(self, model: Crystalformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, data):
        return {"y": self.model(data)["y"], "h": self.model.encode(data)}


def as_f64(data):
    """A copy of a Data/Batch with its floating fields in float64."""
    out = data.clone()
    for key in out.keys():
        if torch.is_tensor(out[key]) and out[key].is_floating_point():
            out[key] = out[key].to(F64)
    return out


def _set_sigma_stats(attn: PeriodicGaussianAttention, shift: float, scale: float) -> None:
    attn.sigma_stats.copy_(torch.tensor([shift, scale]))
    attn._calibrated = True


# ------------------------------------------------------------------------ the paper's model


def test_parameter_count_is_the_papers():
    """853,505 parameters (4 blocks, 128 wide, 8 heads, FFN 512, 64-Gaussian value encoding):
    29.4% of Matformer's 2.9M, as the paper reports; 7 blocks: 1,471,745."""
    per_block = 3 * (128 * 128 + 128) + (128 * 128 + 128) + 128 + 8 * 16 * 64 + (128 * 512 + 512) + (512 * 128 + 128)
    expected = 98 * 128 + 4 * per_block + (128 * 128 + 128) + (128 + 1)
    model = Crystalformer()
    assert model.num_parameters() == expected == 853_505
    assert abs(model.num_parameters() / 2.9e6 - 0.294) < 0.002
    assert Crystalformer(preset="7_blocks").num_parameters() == expected + 3 * per_block
    assert len(model.blocks) == 4 and model.blocks[0].attn.num_heads == 8
    # sigma < r0 / sqrt(b) = 1.4 / sqrt(0.5) Å; lattice sums truncated at 3.5 sigma
    assert model.radius == pytest.approx(3.5 * 1.4 / math.sqrt(0.5))


def test_config_rebuilds_the_same_model(mp_crystals, calibrated_model):
    import json

    config = json.loads(json.dumps(calibrated_model.config))
    rebuilt = Crystalformer(**config)
    rebuilt.load_state_dict(calibrated_model.state_dict())
    assert rebuilt.calibrated  # the sigma statistics travel with the state dict
    batch = Batch.from_data_list(mp_crystals)
    torch.testing.assert_close(rebuilt.eval()(batch)["y"], calibrated_model(batch)["y"], rtol=0, atol=0)
    assert calibrated_model(batch)["y"].shape == (4, 2)


def test_sigma_calibration_happens_once_on_the_first_training_batch(mp_crystals):
    torch.manual_seed(1)
    model = Crystalformer(preset="small")
    batch = Batch.from_data_list(mp_crystals)
    model.eval()(batch)
    assert not model.calibrated  # evaluation never calibrates
    model.train()(batch)
    assert model.calibrated
    stats = [b.attn.sigma_stats.clone() for b in model.blocks]
    assert all(s[1] > 0 for s in stats)
    model(Batch.from_data_list(mp_crystals[:2]))
    for block, s in zip(model.blocks, stats):
        torch.testing.assert_close(block.attn.sigma_stats, s, rtol=0, atol=0)
    # widths stay inside (0, r0 / sqrt(b)) and vary between atoms and heads once calibrated
    x = model.embedding(batch.z - 1)
    sigma = model.blocks[0].attn.sigma(x)
    assert sigma.shape == (batch.num_nodes, 4)
    assert (sigma > 0).all() and (sigma < model.blocks[0].attn.max_sigma).all()
    assert sigma.std() > 1e-3


# ------------------------------------------------------------------------ lattice sums


def test_lattice_sums_of_a_simple_cubic_crystal_are_theta_functions():
    """One atom in a cubic cell: sum_n exp(-a^2|n|^2 / 2 sigma^2) = theta^3 with
    theta = sum_m exp(-a^2 m^2 / 2 sigma^2), and the mean of |r|^2 under those weights is
    3 a^2 sum_m m^2 g_m / theta (the Gaussian factorises over the three axes)."""
    a = 2.7
    sigmas = torch.tensor([[0.9, 1.4, 1.98]], dtype=F64)
    pos = torch.zeros(1, 3, dtype=F64)
    cell = (a * torch.eye(3, dtype=F64)).unsqueeze(0)
    terms = lattice_terms(pos, cell, torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, dtype=torch.long), 12 * 1.98)
    psi = terms.dist2.reshape(-1, 1, 1).expand(-1, 3, 1)
    alpha, total, beta = gaussian_lattice_sums(terms, 1 / (2 * sigmas**2), cutoff_sigmas=12.0, psi=psi)
    m = torch.arange(-40, 41, dtype=F64)
    g = torch.exp(-(a * m[:, None]) ** 2 / (2 * sigmas**2))  # [81, 3]
    theta = g.sum(0)
    torch.testing.assert_close(alpha[0], 3 * torch.log(theta), rtol=1e-13, atol=0)
    torch.testing.assert_close(beta[0, :, 0], 3 * a**2 * (m[:, None] ** 2 * g).sum(0) / theta, rtol=1e-12, atol=0)
    assert terms.num_pairs == 1 and terms.num_terms > 500  # the atom and its own images


def _brute_force_attention(attn: PeriodicGaussianAttention, x, pos, cell, basis_max, reach=26.0):
    """y_i = sum_{j,n} softmax_{j,n}(q_i.k_j/sqrt(d) - d^2/2sigma^2) (v_j + W b(d)) over an explicit box
    of lattice vectors (no truncation by sigma: terms beyond ``reach`` Å weigh < exp(-86))."""
    H, d = attn.num_heads, attn.head_dim
    q = attn.q_proj(x).view(-1, H, d)
    k = attn.k_proj(x).view(-1, H, d)
    v = attn.v_proj(x).view(-1, H, d)
    sigma = attn.sigma(x)  # [N, H]
    heights = torch.linalg.det(cell).abs() / torch.linalg.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]).norm(dim=-1)
    box = [torch.arange(-int(r) - 2, int(r) + 3, dtype=F64) for r in (reach / heights).tolist()]
    shifts = torch.stack(torch.meshgrid(*box, indexing="ij"), -1).reshape(-1, 3) @ cell  # [M, 3]
    out = []
    for i in range(pos.shape[0]):
        logits, values = [], []
        for j in range(pos.shape[0]):
            r = (pos[j] - pos[i] + shifts).norm(dim=-1)
            r = r[r < reach]
            logits.append((q[i] * k[j]).sum(-1) / math.sqrt(d) - r[:, None] ** 2 / (2 * sigma[i] ** 2))  # [M, H]
            psi = torch.einsum("mk,hdk->mhd", distance_basis(r, attn.num_basis, basis_max), attn.value_pe)
            values.append(v[j] + psi)  # [M, H, d]
        w = torch.softmax(torch.cat(logits), dim=0)
        out.append((w.unsqueeze(-1) * torch.cat(values)).sum(0).reshape(-1))
    return attn.out_proj(torch.stack(out))


@pytest.mark.parametrize("name", ["srtio3", "triclinic"])
def test_attention_equals_the_infinite_sum_over_images(name, mp_table):
    """The pseudo-finite attention (alpha, beta per pair, softmax over the cell's atoms) equals the
    softmax over every periodic image written out in full, on real crystals in float64."""
    structure = srtio3() if name == "srtio3" else mp_structure(mp_table, MATERIAL_IDS["triclinic"])
    data = to_data(structure, dtype=F64)
    torch.manual_seed(2)
    attn = PeriodicGaussianAttention(32, 4, cutoff_sigmas=8.0, num_basis=16).to(F64)
    _set_sigma_stats(attn, shift=0.0, scale=25.0)  # widths spread over the whole range
    x = torch.randn(data.num_nodes, 32, dtype=F64)
    assert attn.sigma(x).std() > 0.05
    terms = lattice_terms(data.pos, data.cell, data.pbc, torch.zeros(data.num_nodes, dtype=torch.long), attn.radius)
    basis = distance_basis(terms.dist, 16, 14.0)
    got = attn(x, terms, basis)
    want = _brute_force_attention(attn, x, data.pos, data.cell[0], basis_max=14.0)
    # terms beyond 8 sigma weigh < exp(-32) ~ 1e-14 of the nearest image
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_truncated_sums_converge_as_the_radius_grows(mp_crystals, calibrated_model):
    """Growing cutoff_sigmas (3.5 -> 9) changes the outputs less and less: by < 1e-9 between 7 and 9
    sigma (dropped weights < exp(-24.5)); a longer neighbour search at fixed cutoff_sigmas changes
    nothing (the truncation is a sphere per query, not a range of cells)."""
    batch = as_f64(Batch.from_data_list(mp_crystals))
    outputs = {}
    for c in (3.5, 5.0, 7.0, 9.0):
        model = Crystalformer(**{**calibrated_model.config, "cutoff_sigmas": c}).to(F64)
        model.load_state_dict(calibrated_model.state_dict())
        outputs[c] = model.eval()(batch)["y"].detach()
    errors = [float((outputs[c] - outputs[9.0]).abs().max()) for c in (3.5, 5.0, 7.0)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[0] > 1e-6  # the paper's 3.5 sigma truncation is visible ...
    assert errors[2] < 1e-9 * float(outputs[9.0].abs().max())  # ... and the sum has converged by 7 sigma

    model = calibrated_model.to(F64)
    try:
        attn = model.blocks[0].attn
        x = model.embedding(batch.z - 1)
        near = model.lattice(batch)
        far = lattice_terms(batch.pos, batch.cell, batch.pbc, batch.batch, 2.0 * model.radius)
        assert far.num_terms > 3 * near.num_terms
        y_near = attn(x, near, distance_basis(near.dist, model.num_basis, model.basis_max))
        y_far = attn(x, far, distance_basis(far.dist, model.num_basis, model.basis_max))
        torch.testing.assert_close(y_near, y_far, rtol=1e-13, atol=1e-13)
    finally:
        calibrated_model.float()


# ------------------------------------------------------------------------ symmetries


@pytest.mark.parametrize("name", ["nacl", "srtio3", "triclinic", "skewed"])
def test_periodic_invariance_is_exact(name, mp_table, calibrated_model):
    """Supercells, Niggli/LLL cells, a random unimodular cell, wrapped atoms and translations give the
    same y and the same per-atom features for equivalent atoms, in float64 (to 1e-10)."""
    builders = {"nacl": nacl, "srtio3": srtio3}
    structure = builders[name]() if name in builders else mp_structure(mp_table, MATERIAL_IDS[name])
    supercells = [(2, 2, 2)] if len(structure) <= 8 else [(2, 1, 1)]
    errors = assert_periodic_invariant(WithAtomFeatures(calibrated_model), to_data(structure), intensive=["y"],
                                       per_atom=["h"], supercells=supercells, dtype=F64, seed=3)
    assert errors and all(e < 1e-10 for e in errors.values())


def test_a_strongly_skewed_equivalent_cell_gives_the_same_crystal(mp_table, calibrated_model):
    """The primitive rock-salt cell rewritten as a long, thin, skewed cell (U @ L with det U = 1 and
    cell vectors up to 5x longer) and the triclinic MP cell likewise: same y and atom features."""
    from pymatgen.core import Lattice, Structure

    u = np.array([[1, 3, 2], [0, 1, 4], [0, 0, 1]]) @ np.array([[1, 0, 0], [-2, 1, 0], [1, 1, 1]])
    assert round(np.linalg.det(u)) == 1
    model = WithAtomFeatures(calibrated_model).to(F64).eval()
    try:
        for structure in (nacl().get_primitive_structure(), mp_structure(mp_table, MATERIAL_IDS["triclinic"])):
            skewed = Structure(Lattice(u @ structure.lattice.matrix), structure.species, structure.cart_coords,
                               coords_are_cartesian=True, to_unit_cell=True)
            assert max(skewed.lattice.abc) > 4 * max(structure.lattice.abc)
            assert min(skewed.lattice.angles) < 20  # strongly skewed
            ref, new = model(to_data(structure, dtype=F64)), model(to_data(skewed, dtype=F64))
            torch.testing.assert_close(new["y"], ref["y"], rtol=1e-10, atol=1e-12)
            order = [int(np.argmin(np.linalg.norm(
                (((structure.lattice.get_fractional_coords(p) - structure.frac_coords + 0.5) % 1.0) - 0.5), axis=1)))
                for p in skewed.cart_coords]
            torch.testing.assert_close(new["h"], ref["h"][order], rtol=1e-10, atol=1e-12)
    finally:
        calibrated_model.float()


def test_invariant_under_rotation_reflection_translation_permutation(mp_crystals, calibrated_model):
    errors = assert_equivariant(WithAtomFeatures(calibrated_model), Batch.from_data_list(mp_crystals),
                                irreps={"y": "0e", "h": "0e"}, per_atom=["h"], dtype=F64)
    assert errors


def test_float32_agrees_with_float64(mp_crystals, calibrated_model):
    batch = Batch.from_data_list(mp_crystals)
    y32 = calibrated_model(batch)["y"]
    model64 = Crystalformer(**calibrated_model.config).to(F64)
    model64.load_state_dict(calibrated_model.state_dict())
    y64 = model64.eval()(as_f64(batch))["y"]
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-5)


def test_position_gradients_are_finite_and_match_finite_differences(mp_crystals, calibrated_model):
    """d y / d pos through every image distance (the i = j, n = 0 term sits at distance 0), in float64,
    against central differences; a one-atom crystal (fcc Cu) is in the batch."""
    from pymatgen.core import Lattice, Structure

    copper = Structure(Lattice([[0, 1.8, 1.8], [1.8, 0, 1.8], [1.8, 1.8, 0]]), ["Cu"], [[0, 0, 0]])
    batch = as_f64(Batch.from_data_list([to_data(copper)] + mp_crystals))
    model = Crystalformer(**calibrated_model.config).to(F64)
    model.load_state_dict(calibrated_model.state_dict())
    model.eval()
    pos = batch.pos.clone().requires_grad_(True)
    batch.pos = pos
    weights = torch.randn(batch.num_graphs, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    (model(batch)["y"] * weights).sum().backward()
    assert torch.isfinite(pos.grad).all() and pos.grad.abs().max() > 0
    direction = torch.randn(pos.shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    eps = 1e-5
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            batch.pos = pos.detach() + sign * eps * direction
            values.append(float((model(batch)["y"] * weights).sum()))
    numeric = (values[0] - values[1]) / (2 * eps)
    assert numeric == pytest.approx(float((pos.grad * direction).sum()), rel=1e-6, abs=1e-9)


# ------------------------------------------------------------------------ fused Triton kernels


def compare_backends(device: str, dtype: torch.dtype, preset: str = "small", table: pd.DataFrame | None = None) -> None:
    """The Triton lattice-sum kernels give the torch path's y and parameter gradients on real crystals."""
    table = pd.read_csv(shared_data() / "materials_project" / "flla_2015.csv", comment="#") if table is None else table
    crystals = [to_data(nacl().get_primitive_structure()), to_data(srtio3()),
                to_data(mp_structure(table, MATERIAL_IDS["triclinic"])),
                to_data(mp_structure(table, MATERIAL_IDS["skewed"]))]
    crystals += [to_data(mp_structure(table, mid)) for mid in table[table.nsites >= 20].material_id.head(4)]
    batch = Batch.from_data_list(crystals)
    batch = (as_f64(batch) if dtype == F64 else batch).to(device)
    torch.manual_seed(0)
    ref = Crystalformer(preset=preset, num_targets=2).to(device=device, dtype=dtype).calibrate(batch)
    fused = Crystalformer(**{**ref.config, "attention_backend": "triton"}).to(device=device, dtype=dtype)
    fused.load_state_dict(ref.state_dict())
    assert fused.blocks[0].attn._use_triton(ref.lattice(batch), batch.pos)
    results = []
    for model in (ref, fused):
        y = model(batch)["y"]
        (y * torch.tensor([1.0, -2.0], dtype=dtype, device=device)).sum().backward()
        results.append((y.detach(), {n: p.grad for n, p in model.named_parameters()}))
    rtol = 1e-10 if dtype == F64 else 2e-4
    torch.testing.assert_close(results[1][0], results[0][0], rtol=rtol, atol=rtol * float(results[0][0].abs().max()))
    for name, grad in results[0][1].items():
        scale = float(grad.abs().max())
        if name.endswith("k_proj.bias"):  # exactly zero in exact arithmetic (softmax ignores a key shift)
            continue
        torch.testing.assert_close(results[1][1][name], grad, rtol=rtol, atol=rtol * scale, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_triton_kernels_match_the_torch_path_on_gpu(dtype, mp_table):
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    compare_backends("cuda", dtype, preset="default", table=mp_table)


@pytest.mark.slow
def test_triton_kernels_match_the_torch_path_in_the_interpreter(mp_table):
    """Triton's CPU interpreter (TRITON_INTERPRET=1) runs the same kernels, in a fresh process."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = ("import sys, torch; sys.path.insert(0, %r); import test_crystalformer as t; "
            "torch.set_num_threads(1); t.compare_backends('cpu', torch.float64)") % str(Path(__file__).parent)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------------ training and errors


def test_training_on_materials_project_lowers_the_loss(mp_table):
    """The paper's model (AdamW 5e-4, betas 0.9/0.98, clip 1) on 100 real MP structures
    (formation energy per atom, standardised): the L1 loss falls within 10 epochs."""
    rows = mp_table[mp_table.nsites <= 8].head(100)
    from pymatgen.core import Structure

    datas = [to_data(Structure.from_dict(ast.literal_eval(r.structure)), r.formation_energy_per_atom)
             for r in rows.itertuples()]
    y = torch.cat([d.y for d in datas])
    mean, std = y.mean(), y.std()
    batches = [Batch.from_data_list(datas[i:i + 25]) for i in range(0, 100, 25)]
    torch.manual_seed(0)
    model = Crystalformer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), weight_decay=1e-5)
    losses = []
    for _ in range(10):
        total = 0.0
        for batch in batches:
            loss = (model(batch)["y"] - (batch.y - mean) / std).abs().mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            total += loss.item() / len(batches)
        losses.append(total)
    assert model.calibrated
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses


@pytest.mark.parametrize("target", ["e_form", "gap"])
def test_configs_train_with_property_task_and_crystal_datamodule(target, tmp_path, mp_table):
    """configs/mp/crystalformer_<target>.yaml: the paper's model and optimiser settings, and its data
    section (CrystalDataModule) trains offline on 80 MP structures with PropertyTask (small width)."""
    import inspect

    import lightning.pytorch as pl
    import yaml

    from equiformer.models import MODEL_REGISTRY, register_model
    from equiformer.tasks.crystal_datamodule import CrystalDataModule
    from equiformer.tasks.property import PropertyTask

    path = Path(__file__).resolve().parents[1] / "configs" / "mp" / f"crystalformer_{target}.yaml"
    config = yaml.safe_load(path.read_text())
    model_section, data_section = config["model"], config["data"]
    assert model_section["model"] == "crystalformer" and model_section["loss"] == "l1"
    assert (model_section["lr"], model_section["betas"], model_section["weight_decay"]) == (5e-4, [0.9, 0.98], 1e-5)
    assert Crystalformer(**model_section["model_kwargs"]).num_parameters() == 853_505
    assert config["trainer"]["max_epochs"] == 500 and data_section["init_args"]["batch_size"] == 128
    assert data_section["class_path"] == "equiformer.tasks.crystal_datamodule.CrystalDataModule"
    inspect.signature(PropertyTask).bind(**model_section)
    if "crystalformer" not in MODEL_REGISTRY:
        register_model("crystalformer", "equiformer.models.crystalformer:Crystalformer")
    offline = {"source": "flla_2015", "subset": 80, "split": "random", "root": str(tmp_path), "batch_size": 16,
               "eval_batch_size": 32, "num_workers": 0, "pin_memory": False, "progress": False}
    torch.manual_seed(0)
    datamodule = CrystalDataModule(**{**data_section["init_args"], **offline})
    task = PropertyTask(**{**model_section, "model_kwargs": {"preset": "small"}, "targets": datamodule.target_names})
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=config["trainer"]["gradient_clip_val"])
    trainer.fit(task, datamodule)
    assert task.model.calibrated  # the sigma statistics were set by the first training batch
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"])) and math.isfinite(float(metrics["val/mae_norm"]))


def test_bad_inputs_give_clear_errors(mp_crystals):
    model = Crystalformer(preset="small")
    data = mp_crystals[0].clone()
    data.z = torch.full_like(data.z, 99)  # Es: beyond the paper's 98 elements
    with pytest.raises(ValueError, match=r"atomic number 99 \(Es\)"):
        model(data)
    molecule = mp_crystals[1].clone()
    del molecule.cell
    with pytest.raises(ValueError, match="no 'cell'"):
        model(molecule)
    with pytest.raises(ValueError, match="unknown Crystalformer preset"):
        Crystalformer(preset="huge")
    with pytest.raises(ValueError, match="divisible"):
        Crystalformer(preset="small", dim=30, num_heads=4)
    assert set(PRESETS) == {"default", "7_blocks", "small"}
