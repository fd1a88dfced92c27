"""EquiformerV2: SO(2) convolutions, S2 activation, separable layer norm, and the full model on real
structures (QM9 molecules from qm9pack, an ASE Cu(111)+O slab, a real OC20 frame): rotation,
translation and permutation equivariance in float64, gradient forces against finite differences,
periodic invariance (supercell, wrapped atoms, skewed cell), tie-aware neighbour caps, presets."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from ase.build import add_adsorbate, bulk, fcc111
from ase.io import read as ase_read
from torch_geometric.data import Batch, Data

from equiformer.data import from_ase
from equiformer.data.contract import atomic_number, make_data
from equiformer.graph import build_edges
from equiformer.models import build_model
from equiformer.models.equiformer_v2 import PRESETS, EquiformerV2, limit_neighbors
from equiformer.nn.eqv2_layers import SeparableLayerNorm, SeparableS2Activation
from equiformer.nn.so2 import EdgeRotation, SO2Convolution
from equiformer.o3.wigner import WignerD, order_major_coefficients, wigner_D_from_matrix
from equiformer.testing import (
    assert_equivariant,
    assert_forces_are_gradients,
    assert_periodic_invariant,
    assert_smooth_at_cutoff,
)

F64 = torch.float64


# ------------------------------------------------------------------------------------ fixtures


pytestmark = pytest.mark.usefixtures("one_thread_module")


def shared_data() -> Path:
    env = os.environ.get("EQUIFORMER_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def molecules() -> list[Data]:
    """Three real QM9 molecules of 12-19 atoms (float64)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qm9pack is not installed")
    csv = Path(spec.submodule_search_locations[0]) / "data" / "qm9_part1.csv"
    table = pd.read_csv(csv, nrows=300, usecols=["Index", "Elements", "XYZ_Ang"])
    table = table[table["Elements"].map(lambda s: 12 <= len(ast.literal_eval(s)) <= 19)]
    out = []
    for index, elements, xyz in table.head(3).itertuples(index=False):
        z = torch.tensor([atomic_number(s) for s in ast.literal_eval(elements)])
        out.append(make_data(z, torch.tensor(json.loads(xyz), dtype=F64), source=f"qm9 #{index}", dtype=F64))
    return out


@pytest.fixture(scope="module")
def slab() -> Data:
    """Cu(111) 2x2x3 with an O adatom in the fcc hollow, periodic in-plane (13 atoms)."""
    atoms = fcc111("Cu", (2, 2, 3), vacuum=8.0)
    add_adsorbate(atoms, "O", 1.5, "fcc")
    atoms.pbc = (True, True, False)
    data = from_ase(atoms)
    data.pos, data.cell = data.pos.to(F64), data.cell.to(F64)
    return data


@pytest.fixture(scope="module")
def oc20_frame(tmp_path_factory) -> Data:
    """First frame of a real OC20 relaxation (HNa36Tl12, 49 atoms, periodic), from the shared data."""
    archive = shared_data() / "oc20" / "oc20_relaxation_trajectories.tar.gz"
    if not archive.exists():
        pytest.skip(f"{archive} not found (set EQUIFORMER_SHARED_DATA)")
    folder = tmp_path_factory.mktemp("oc20")
    with tarfile.open(archive) as tar:
        member = tar.getmember("trajs/random1000156.traj")
        with tar.extractfile(member) as src:
            (folder / "frame.traj").write_bytes(src.read())
    data = from_ase(ase_read(folder / "frame.traj", index=0))
    data.pos, data.cell = data.pos.to(F64), data.cell.to(F64)
    for key in ("energy", "forces"):
        if key in data:
            del data[key]
    return data


def make_model(activation: str = "gate", **kwargs) -> EquiformerV2:
    torch.manual_seed(0)
    return EquiformerV2(preset="small", activation=activation, **kwargs).double().eval()


def haar_rotations(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=gen, dtype=F64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q * torch.sign(torch.linalg.det(q)).view(-1, 1, 1)


def order_major_wigner(R: torch.Tensor, lmax: int, mmax: int) -> torch.Tensor:
    """Wigner-D of rotations about +y restricted to the edge-frame layout [E, n, n]."""
    D = wigner_D_from_matrix(R, lmax)
    coefficients = order_major_coefficients(lmax, mmax)
    out = R.new_zeros(R.shape[0], len(coefficients), len(coefficients))
    for a, (l, m) in enumerate(coefficients):
        for b, (l2, m2) in enumerate(coefficients):
            if l == l2:
                out[:, a, b] = D[l][:, l + m, l + m2]
    return out


def rotation_about_y(angles: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack([torch.stack([c, zero, s], -1), torch.stack([zero, one, zero], -1), torch.stack([-s, zero, c], -1)], -2)


def block_wigner(R: torch.Tensor, lmax: int) -> torch.Tensor:
    """Full block-diagonal Wigner-D [E, (lmax+1)^2, (lmax+1)^2]."""
    blocks = wigner_D_from_matrix(R, lmax)
    out = R.new_zeros(R.shape[0], (lmax + 1) ** 2, (lmax + 1) ** 2)
    for l, D in enumerate(blocks):
        out[:, l * l : (l + 1) ** 2, l * l : (l + 1) ** 2] = D
    return out


# --------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize("radial", [True, False])
def test_so2_convolution_commutes_with_rotations_about_the_edge(radial):
    lmax, mmax, num_edges = 4, 2, 9
    torch.manual_seed(1)
    conv = SO2Convolution(5, 3, lmax, mmax, edge_channels=[6, 8] if radial else None, extra_m0_channels=4).double()
    n = len(order_major_coefficients(lmax, mmax))
    x = torch.randn(num_edges, n, 5, dtype=F64)
    features = torch.randn(num_edges, 6, dtype=F64) if radial else None
    D = order_major_wigner(rotation_about_y(torch.rand(num_edges, dtype=F64) * 2 * math.pi), lmax, mmax)
    y, extra = conv(x, features)
    y_rot, extra_rot = conv(D @ x, features)
    assert (y_rot - D @ y).abs().max() < 1e-13
    assert (extra_rot - extra).abs().max() < 1e-13
    assert y.shape == (num_edges, n, 3) and extra.shape == (num_edges, 4)
    # not trivially equivariant: a general rotation (not about the edge) does not commute
    D_general = order_major_wigner(haar_rotations(num_edges, 2), lmax, mmax)
    assert (conv(D_general @ x, features)[0] - D_general @ y).abs().max() > 1e-3


def test_edge_frame_message_is_so3_equivariant():
    """rotate -> SO(2) conv -> rotate back is SO(3)-equivariant for edges along the axes, nearly along
    +-y, antiparallel pairs and random directions (the frame's roll is invisible)."""
    lmax, mmax = 3, 2
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(4)
    vec = torch.cat(
        [
            torch.eye(3, dtype=F64),
            -torch.eye(3, dtype=F64),
            torch.tensor([[1e-12, 1.0, 0.0], [0.0, -1.0, 1e-12]], dtype=F64),
            torch.randn(6, 3, generator=gen, dtype=F64),
        ]
    )
    wigner = WignerD(lmax).double()
    conv = SO2Convolution(4, 4, lmax, mmax, edge_channels=[2, 8]).double()
    x = torch.randn(vec.shape[0], (lmax + 1) ** 2, 4, generator=gen, dtype=F64)
    features = torch.randn(vec.shape[0], 2, generator=gen, dtype=F64)

    def message(v: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        rotation = EdgeRotation.from_edges(v, wigner, mmax)
        return rotation.rotate_back(conv(rotation.rotate(feats), features)[0])

    R = haar_rotations(1, 5)[0]
    D = block_wigner(R.expand(vec.shape[0], 3, 3), lmax)
    out, out_rot = message(vec, x), message(vec @ R.T, D @ x)
    assert (out_rot - D @ out).abs().max() < 1e-12 * out.abs().max()


def test_edge_rotation_keeps_only_the_m0_part_of_the_edge_and_inverts():
    lmax = 4
    gen = torch.Generator().manual_seed(6)
    vec = torch.randn(7, 3, generator=gen, dtype=F64)
    from e3nn import o3

    sh = o3.spherical_harmonics(list(range(lmax + 1)), vec, normalize=True, normalization="component")
    rotation = EdgeRotation.from_edges(vec, WignerD(lmax).double(), 2)
    in_frame = rotation.rotate(sh.unsqueeze(-1)).squeeze(-1)
    assert (in_frame[:, lmax + 1 :]).abs().max() < 1e-13  # only (l, 0), the first lmax+1 entries
    assert (in_frame[:, : lmax + 1] - torch.tensor([math.sqrt(2 * l + 1) for l in range(lmax + 1)], dtype=F64)).abs().max() < 1e-12
    full = EdgeRotation.from_edges(vec, WignerD(lmax).double(), lmax)
    x = torch.randn(7, (lmax + 1) ** 2, 3, generator=gen, dtype=F64)
    assert (full.rotate_back(full.rotate(x)) - x).abs().max() < 1e-13


def test_separable_s2_activation_symmetries_and_convergence():
    """Exactly equivariant for rotations about +y by grid steps; for other rotations the error
    is the grid's quadrature error, which falls quickly with the resolution."""
    lmax, mmax, channels = 4, 2, 6
    gen = torch.Generator().manual_seed(7)
    n = len(order_major_coefficients(lmax, mmax))
    x = torch.randn(5, n, channels, generator=gen, dtype=F64)
    scalars = torch.randn(5, channels, generator=gen, dtype=F64)

    act = SeparableS2Activation(lmax, mmax, (10, 12), layout="order").double()
    out = act(scalars, x)
    assert (out[:, 0] - torch.nn.functional.silu(scalars)).abs().max() < 1e-15
    step = order_major_wigner(rotation_about_y(torch.full((5,), 2 * math.pi / 12 * 5, dtype=F64)), lmax, mmax)
    assert (act(scalars, step @ x) - step @ out).abs().max() < 1e-12

    D = order_major_wigner(rotation_about_y(torch.rand(5, generator=gen, dtype=F64) * 2 * math.pi), lmax, mmax)
    errors = []
    for res in (8, 16, 32):
        act = SeparableS2Activation(lmax, mmax, res, layout="order").double()
        errors.append(((act(scalars, D @ x) - D @ act(scalars, x)).abs().max() / act(scalars, x).abs().max()).item())
    assert errors[0] > 5 * errors[1] > 25 * errors[2], errors  # unit-variance inputs: SiLU far from linear
    assert errors[0] < 0.2 and errors[2] < 1e-3, errors


def test_separable_layer_norm_is_equivariant_and_normalises_scalars():
    lmax, channels = 3, 8
    gen = torch.Generator().manual_seed(8)
    norm = SeparableLayerNorm(lmax, channels).double()
    with torch.no_grad():
        norm.affine_weight.uniform_(0.5, 1.5)
    x = torch.randn(4, (lmax + 1) ** 2, channels, generator=gen, dtype=F64) * 3 + 1
    D = block_wigner(haar_rotations(4, 9), lmax)
    out = norm(x)
    assert (norm(D @ x) - D @ out).abs().max() < 1e-13
    assert out[:, 0].mean(-1).abs().max() < 1e-12 and (out[:, 0].var(-1, unbiased=False) - 1).abs().max() < 1e-4
    # l > 0: degree-balanced mean square over channels is 1 before the learned scale
    plain = SeparableLayerNorm(lmax, channels).double()(x)[:, 1:]
    balance = torch.tensor([1.0 / ((2 * l + 1) * lmax) for l in range(1, lmax + 1) for _ in range(2 * l + 1)], dtype=F64)
    assert (torch.einsum("nkc,k->n", plain.pow(2), balance) / channels - 1).abs().max() < 1e-4


# ---------------------------------------------------------------------------------- the model


def test_paper_presets_and_parameter_counts():
    """Presets follow the paper's OC20 configs; parameter counts match 31M / 83M / 153M."""
    assert PRESETS["31M"]["num_layers"] == 8 and PRESETS["31M"]["lmax"] == 4 and PRESETS["31M"]["mmax"] == 2
    assert PRESETS["83M"]["num_layers"] == 12 and PRESETS["83M"]["lmax"] == 6 and PRESETS["83M"]["mmax"] == 2
    assert PRESETS["153M"]["num_layers"] == 20 and PRESETS["153M"]["lmax"] == 6 and PRESETS["153M"]["mmax"] == 3
    for p in ("31M", "83M", "153M"):
        cfg = PRESETS[p]
        assert (cfg["sphere_channels"], cfg["attn_hidden_channels"], cfg["num_heads"]) == (128, 64, 8)
        assert (cfg["attn_alpha_channels"], cfg["attn_value_channels"], cfg["ffn_hidden_channels"]) == (64, 16, 128)
        assert cfg["cutoff"] == 12.0 and cfg["max_neighbors"] == 20 and cfg["grid_resolution"] == 18
    for preset, paper in (("31M", 31e6), ("83M", 83e6), ("153M", 153e6)):
        with torch.device("meta"):
            model = EquiformerV2(preset=preset)
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - paper) < 0.01 * paper, (preset, count)
    small = sum(p.numel() for p in make_model("s2").parameters())
    assert 2e5 < small < 2e6, small


@pytest.mark.parametrize("name", ["molecules", "slab", "oc20_frame"])
def test_gate_model_is_exactly_se3_equivariant(name, request):
    """Gate activation: every operation is exactly equivariant (float64 round-off), direct forces."""
    data = request.getfixturevalue(name)
    if isinstance(data, list):
        data = Batch.from_data_list(data)
    errors = assert_equivariant(make_model("gate"), data, parity=False, dtype=F64)
    assert max(errors.values()) < 1e-10, errors


def test_gate_model_with_gradient_forces_is_equivariant(slab):
    model = make_model("gate", direct_forces=False)
    errors = assert_equivariant(model, slab, parity=False, dtype=F64)
    assert max(errors.values()) < 1e-10


def test_s2_model_is_equivariant_up_to_the_grid_error(slab):
    """Paper's S2 activation: translation and permutation exact; rotation error falls with the grid."""
    exact = assert_equivariant(make_model("s2"), slab, parity=False, rotation=False, dtype=F64)
    assert max(exact.values()) < 1e-10, exact
    errors = {}
    for res in (8, 20):
        model = make_model("s2", grid_resolution=res)
        ref = model(slab)
        found = assert_equivariant(
            model, slab, parity=False, translation=False, permutation=False, dtype=F64, rtol=0.05, n_trials=1
        )
        errors[res] = max(found["rotation/forces"] / ref["forces"].abs().max().item(), found["rotation/energy"] / ref["energy"].abs().item())
    assert errors[8] < 0.1 and errors[20] < errors[8] / 20, errors


def test_gradient_forces_equal_finite_differences(molecules, slab):
    for activation, structures in (("gate", (molecules[0], slab)), ("s2", (slab,))):
        model = make_model(activation, direct_forces=False)
        for data in structures:
            result = assert_forces_are_gradients(model, data, dtype=F64, n_atoms_checked=2)
            assert result["max_error"] < 1e-6


@pytest.mark.parametrize("activation", ["s2", "gate"])
def test_periodic_invariance_on_a_slab(activation, slab):
    """A 2x2x1 supercell, atoms wrapped by lattice vectors, a skewed in-plane cell and a translation
    give the same per-atom forces and an extensive energy, for both activations (same edge vectors)."""
    model = make_model(activation)
    errors = assert_periodic_invariant(
        model, slab, checks=("supercell", "unimodular", "wrap", "translate"), supercells=((2, 2, 1),), dtype=F64
    )
    assert max(errors.values()) < 1e-10, errors


def test_periodic_invariance_of_gradient_forces_on_a_real_oc20_frame(oc20_frame):
    model = make_model("s2", direct_forces=False)
    errors = assert_periodic_invariant(model, oc20_frame, checks=("supercell", "wrap"), supercells=((2, 1, 1),), dtype=F64)
    assert max(errors.values()) < 1e-9, errors


def test_outputs_batching_targets_and_reductions(molecules, slab):
    model = make_model("s2", num_targets=3)
    batch = Batch.from_data_list([molecules[0], slab, molecules[1]])
    out = model(batch)
    assert out["energy"].shape == (3,) and out["forces"].shape == (batch.num_nodes, 3) and out["y"].shape == (3, 3)
    for i, data in enumerate([molecules[0], slab, molecules[1]]):
        single = model(data)
        start = int(batch.ptr[i])
        assert (single["energy"] - out["energy"][i]).abs().max() < 1e-12
        assert (single["y"] - out["y"][i]).abs().max() < 1e-12
        assert (single["forces"] - out["forces"][start : start + data.num_nodes]).abs().max() < 1e-12
    # per-atom energy option = summed energy * avg_num_nodes / N
    mean_model = make_model("s2", energy_reduce="mean")
    summed = make_model("s2")(slab)["energy"]
    assert torch.allclose(mean_model(slab)["energy"], summed * summed.new_tensor(PRESETS["small"]["avg_num_nodes"]) / slab.num_nodes)
    assert set(make_model("s2", regress_forces=False)(slab)) == {"energy"}


def test_max_neighbors_keeps_tied_shells_and_stays_equivariant():
    """fcc Cu has 12 equidistant nearest neighbours: a cap of 8 keeps all 12 (ties), which keeps the
    model equivariant (fairchem issue #1068); a strict cap keeps exactly 8 by edge order."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    data = from_ase(atoms)
    data.pos, data.cell = data.pos.to(F64), data.cell.to(F64)
    model = make_model("gate", max_neighbors=8, cutoff=3.0)
    edge_index, _ = model.edges(data)
    assert torch.bincount(edge_index[1]).tolist() == [12] * 4
    strict = make_model("gate", max_neighbors=8, cutoff=3.0, max_neighbors_strict=True)
    assert torch.bincount(strict.edges(data)[0][1]).tolist() == [8] * 4
    errors = assert_equivariant(model, data, parity=False, dtype=F64)
    assert max(errors.values()) < 1e-10
    # a distorted structure: exactly the k nearest, plus those within the tolerance of the k-th
    dist = torch.tensor([1.0, 2.0, 2.005, 3.0, 1.5, 1.5, 1.5], dtype=F64)
    index = torch.tensor([[1, 2, 3, 4, 0, 2, 3], [0, 0, 0, 0, 1, 1, 1]])
    keep = limit_neighbors(index, dist, 5, 2, tolerance=0.01)
    assert keep.tolist() == [True, True, True, False, True, True, True]


def test_energy_is_smooth_when_an_atom_crosses_the_cutoff(molecules):
    result = assert_smooth_at_cutoff(make_model("s2", direct_forces=False), molecules[0], cutoff=5.0, pair=(0, 5), dtype=F64)
    assert result["energy_jump"] <= 3 * result["energy_step"] + 1e-12


def test_float32_agrees_with_float64(slab):
    model64 = make_model("s2")
    model32 = EquiformerV2(**model64.config).eval()
    model32.load_state_dict(model64.state_dict())
    model32 = model32.float()
    data32 = slab.clone()
    data32.pos, data32.cell = slab.pos.float(), slab.cell.float()
    out64, out32 = model64(slab), model32(data32)
    for key in ("energy", "forces"):
        assert out32[key].dtype == torch.float32
        assert (out32[key].double() - out64[key]).abs().max() < 1e-4 * out64[key].abs().max()


def test_config_round_trip_and_training_mode(slab):
    model = make_model("s2", num_targets=2, drop_path_rate=0.5, alpha_drop=0.3)
    config = json.loads(json.dumps(model.config))
    clone = build_model("equiformer_v2", **config).double().eval()
    assert isinstance(clone, EquiformerV2)
    clone.load_state_dict(model.state_dict(), strict=True)
    ref = model(slab)
    assert all(torch.equal(ref[k], clone(slab)[k]) for k in ref)
    assert torch.equal(model(slab)["energy"], ref["energy"])  # eval: no dropout, no drop path
    model.train()
    torch.manual_seed(11)
    outs = [model(slab)["energy"] for _ in range(4)]
    assert any(not torch.equal(o, outs[0]) for o in outs[1:])  # stochastic depth / attention dropout act
    loss = sum(o.sum() for o in outs)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("blocks.0."))
    no_decay = model.no_weight_decay()
    linear_weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert not no_decay & linear_weights and "blocks.0.norm_1.affine_weight" in no_decay
    assert "blocks.0.attention.alpha_norm.weight" in no_decay and "radial_basis.mean" in no_decay


def test_bad_input_and_config_errors(slab):
    model = make_model("gate")
    with pytest.raises(ValueError, match="'z'"):
        model(Data(pos=slab.pos))
    bad = slab.clone()
    bad.z = bad.z.clone()
    bad.z[0] = 95
    with pytest.raises(ValueError, match=r"\[0, 90\)"):
        make_model("gate", max_num_elements=90)(bad)
    with pytest.raises(ValueError, match="preset"):
        EquiformerV2(preset="7M")
    with pytest.raises(ValueError, match="activation"):
        EquiformerV2(preset="small", activation="relu")
    with pytest.raises(ValueError, match="energy head"):
        EquiformerV2(preset="small", regress_energy=False, direct_forces=False)
    with pytest.raises(ValueError, match="too coarse"):
        EquiformerV2(preset="small", grid_resolution=4)
