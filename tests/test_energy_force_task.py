"""EnergyForceTask: metrics against hand-computed values, fixed atoms out of the force loss,
gradient forces = -dE/dpos of the de-normalised energy, learning on real OC20 frames, the
trajectory DataModule + checkpoints, MD17-style molecules, statistics and the OC20 configs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset
from torch_geometric.data import Batch, Data

SHARED = Path(os.environ.get("EQUIFORMER_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
TARBALL = SHARED / "oc20" / "oc20_relaxation_trajectories.tar.gz"
ROOT = Path(__file__).resolve().parents[1]

#: a 1-block Equiformer small enough for CPU tests (about 8k parameters)
TINY = dict(preset="small", num_layers=1, irreps_node="16x0e+4x1e", irreps_head="8x0e+2x1e", num_heads=2,
            irreps_mlp_mid="32x0e+8x1e", irreps_feature="16x0e", lmax=1, num_basis=8, radial_hidden=[16],
            cutoff=4.0, alpha_drop=0.0)
#: three small real relaxations (33, 37, 38 atoms)
LEARN_TRAJS = ["random1000100", "random1000187", "random1000120"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found: {path} (set EQUIFORMER_SHARED_DATA)")
    return path


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("oc20_cache")


@pytest.fixture(scope="module")
def frames(cache_root):
    """The first 40 steps (every 2nd) of three real OC20 relaxations: 60 frames."""
    from equiformer.datasets.oc20 import OC20Trajectories

    return OC20Trajectories(root=cache_root, source=_need(TARBALL), trajectories=LEARN_TRAJS, frame_stride=2,
                            max_frames_per_trajectory=20)


def _trainer(**kw):
    import lightning as L

    opts = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, gradient_clip_val=10.0, accelerator="cpu", devices=1)
    opts.update(kw)
    return L.Trainer(**opts)


def _task(**kw):
    from equiformer.tasks.energy_force import EnergyForceTask

    opts = dict(model="equiformer", model_kwargs=dict(TINY), lr=3e-3, warmup_steps=2, ema_decay=None,
                energy_weight=1.0, force_weight=10.0)
    opts.update(kw)
    return EnergyForceTask(**opts)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def test_metrics_against_hand_computed_values():
    from equiformer.tasks.energy_force_metrics import EnergyForceMetrics

    # structure 0: 2 atoms, |dE| = 0.01 eV, largest force-component error 0.02 eV/A -> within threshold
    # structure 1: 3 atoms, |dE| = 0.05 eV (fails), atom 2 fixed (excluded) with a 4 eV/A error
    e_true = torch.tensor([1.0, -2.0], dtype=torch.float64)
    e_pred = torch.tensor([1.01, -2.05], dtype=torch.float64)
    natoms = torch.tensor([2, 3])
    f_true = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 2, 0]], dtype=torch.float64)
    f_pred = torch.tensor([[1.02, 0, 0], [0, 1, 0.01], [0, 0, 2], [1, 1, 0], [0, -2, 0]], dtype=torch.float64)
    index = torch.tensor([0, 0, 1, 1, 1])
    mask = torch.tensor([True, True, True, True, False])
    m = EnergyForceMetrics()
    m.update(e_pred, e_true, natoms, f_pred, f_true, index, mask)
    out = {k: float(v) for k, v in m.compute().items()}
    assert out["energy_mae_meV"] == pytest.approx(1000 * (0.01 + 0.05) / 2)
    assert out["energy_mae_meV_per_atom"] == pytest.approx(1000 * (0.01 / 2 + 0.05 / 3) / 2)
    assert out["force_mae_meV_per_A"] == pytest.approx(1000 * (0.02 + 0.01 + 1.0) / 12)
    assert out["force_l2mae_meV_per_A"] == pytest.approx(1000 * (0.02 + 0.01 + 1.0 + 0.0) / 4)
    assert out["force_cos"] == pytest.approx((1 + 1 / math.sqrt(1.0001) + 1 + 1) / 4)
    assert out["efwt"] == pytest.approx(0.5)
    assert out["num_atoms"] == 4 and out["num_structures"] == 2

    # energy of structure 1 now fine, but its free atom 0 has a 1 eV/A error: still 1 of 2
    m.reset()
    m.update(torch.tensor([1.01, -2.019]), e_true, natoms, f_pred, f_true, index, mask)
    assert float(m.compute()["efwt"]) == pytest.approx(0.5)
    # ... and with that error only on a fixed atom, both structures count
    m.reset()
    f_ok = f_true.clone()
    f_ok[4] += 5.0
    m.update(torch.tensor([1.01, -2.019]), e_true, natoms, f_ok, f_true, index, mask)
    assert float(m.compute()["efwt"]) == pytest.approx(1.0)
    # without the mask the fixed atom counts: 0.5 again, and its cosine (-1 for [0,2,0] vs [0,-2,0]) enters
    m.reset()
    m.update(e_pred, e_true, natoms, f_pred, f_true, index)
    assert float(m.compute()["force_cos"]) == pytest.approx((1 + 1 / math.sqrt(1.0001) + 1 + 1 - 1) / 5)
    # accumulating two halves equals one update (what DDP's sum reduction relies on)
    a, b = EnergyForceMetrics(), EnergyForceMetrics()
    a.update(e_pred, e_true, natoms, f_pred, f_true, index, mask)
    b.update(e_pred[:1], e_true[:1], natoms[:1], f_pred[:2], f_true[:2], index[:2], mask[:2])
    b.update(e_pred[1:], e_true[1:], natoms[1:], f_pred[2:], f_true[2:], index[2:] - 1, mask[2:])
    for k, v in a.compute().items():
        assert float(b.compute()[k]) == pytest.approx(float(v)), k


# ---------------------------------------------------------------------------------------------
# loss masking, gradient forces
# ---------------------------------------------------------------------------------------------


def _slab_batch():
    """Cu(111) slab + O + C with OC20 tags (0 bulk, 1 surface, 2 adsorbate), bottom layers fixed, EMT labels."""
    from ase.build import add_adsorbate, fcc111
    from ase.calculators.emt import EMT
    from ase.constraints import FixAtoms

    from equiformer.data import from_ase

    out = []
    for shift in (0.0, 0.15):
        slab = fcc111("Cu", (2, 2, 3), vacuum=7.0)
        layer = slab.get_tags().copy()
        add_adsorbate(slab, "O", 1.4 + shift, "fcc")
        add_adsorbate(slab, "C", 1.8, "hcp")
        slab.pbc = True
        slab.set_tags(np.r_[np.where(layer == 1, 1, 0), [2, 2]])
        slab.set_constraint(FixAtoms(mask=np.r_[layer >= 2, [False, False]]))
        slab.calc = EMT()
        slab.get_potential_energy()
        out.append(from_ase(slab))
    return Batch.from_data_list(out)


def test_fixed_atoms_do_not_change_the_force_loss(frames):
    task = _task(normalization={"energy_mean": -100.0, "energy_std": 50.0, "force_std": 0.3})
    batch = Batch.from_data_list([frames[0], frames[25]])
    assert batch.fixed.any() and not batch.fixed.all()
    torch.manual_seed(0)
    pred = {"energy_norm": torch.randn(2), "forces": torch.randn(batch.num_nodes, 3)}
    base = task.loss_terms(batch, pred)
    moved = dict(pred, forces=pred["forces"].clone())
    moved["forces"][batch.fixed] += 10.0 * torch.randn(int(batch.fixed.sum()), 3)
    again = task.loss_terms(batch, moved)
    assert float(again["force_loss"]) == float(base["force_loss"]) and float(again["loss"]) == float(base["loss"])
    free = int(torch.nonzero(~batch.fixed)[0])
    moved["forces"][free] += 1.0
    assert float(task.loss_terms(batch, moved)["force_loss"]) != float(base["force_loss"])
    # training on all atoms: the fixed atoms' predictions matter
    all_atoms = _task(normalization={"energy_mean": -100.0, "energy_std": 50.0, "force_std": 0.3}, train_on_free_atoms=False)
    moved_fixed = dict(pred, forces=pred["forces"].clone())
    moved_fixed["forces"][batch.fixed] += 1.0
    assert float(all_atoms.loss_terms(batch, moved_fixed)["force_loss"]) != float(all_atoms.loss_terms(batch, pred)["force_loss"])
    # l2mae by hand: mean over free atoms of |dF| / force_std
    f_err = (pred["forces"] - batch.forces)[~batch.fixed]
    assert float(base["force_loss"]) == pytest.approx(float((f_err.norm(dim=-1) / 0.3).mean()), rel=1e-6)


def test_force_tags_select_surface_and_adsorbate():
    batch = _slab_batch()
    task = _task(normalization={"energy_mean": 0.0, "energy_std": 1.0, "force_std": 1.0}, force_tags=[2])
    mask = task.force_mask(batch)
    assert mask.tolist() == (batch.tags == 2).tolist()  # adsorbate atoms only (they are free)
    task12 = _task(normalization={"energy_mean": 0.0, "energy_std": 1.0, "force_std": 1.0}, force_tags=[1, 2])
    assert int(task12.force_mask(batch).sum()) == 2 * (4 + 2)
    pred = {"energy_norm": torch.zeros(2), "forces": torch.zeros(batch.num_nodes, 3)}
    surface = batch.tags == 1
    moved = dict(pred, forces=pred["forces"].clone())
    moved["forces"][surface] += 1.0
    assert float(task.loss_terms(batch, moved)["force_loss"]) == float(task.loss_terms(batch, pred)["force_loss"])
    assert float(task12.loss_terms(batch, moved)["force_loss"]) != float(task12.loss_terms(batch, pred)["force_loss"])


@pytest.mark.parametrize("energy_target", ["total", "per_atom"])
def test_gradient_forces_are_minus_de_dpos(frames, energy_target):
    refs = torch.zeros(119, dtype=torch.float64)
    refs[[1, 6, 8, 29, 79]] = torch.tensor([-3.4, -7.1, -4.9, -3.7, -3.2], dtype=torch.float64)
    task = _task(energy_target=energy_target,
                 normalization={"energy_mean": -2.5, "energy_std": 3.0, "force_std": 0.2, "atom_refs": refs})
    assert task.gradient_forces and not task.model_gradient_forces
    task = task.double().eval()
    data = frames[7]
    batch = Batch.from_data_list([data, frames[30]])
    batch.pos, batch.cell = batch.pos.double(), batch.cell.double()
    res = task.predict_batch(batch, task.model)
    assert res["energy"].dtype == torch.float64 and res["forces"].shape == batch.pos.shape
    h = 1e-5
    for atom, comp in ((0, 2), (3, 0), (40, 1)):
        plus, minus = batch.clone(), batch.clone()
        plus.pos[atom, comp] += h
        minus.pos[atom, comp] -= h
        g = int(batch.batch[atom])
        de = (task.predict_batch(plus, task.model)["energy"][g] - task.predict_batch(minus, task.model)["energy"][g]) / (2 * h)
        assert float(res["forces"][atom, comp]) == pytest.approx(-float(de), rel=1e-5, abs=1e-8)
    # the energy in eV is the de-normalised network output, references included
    n = torch.bincount(batch.batch).double()
    s = n if energy_target == "per_atom" else torch.ones(2, dtype=torch.float64)
    ref_sum = torch.stack([refs[batch.z[batch.batch == k]].sum() for k in range(2)])
    expected = res["energy_norm"].double() * 3.0 * s + (-2.5) * s + ref_sum
    torch.testing.assert_close(res["energy"], expected)


def test_model_gradient_forces_path_matches_autograd(frames):
    """Equiformer(predict_forces=True) returns -d(output)/dpos; the task rescales it to eV/A and
    gets what differentiating the de-normalised energy itself gives."""
    norm = {"energy_mean": -1.0, "energy_std": 4.0, "force_std": 0.5}
    own = _task(normalization=norm, energy_target="per_atom").eval()
    via_model = _task(model_kwargs=dict(TINY, predict_forces=True), normalization=norm, energy_target="per_atom").eval()
    assert via_model.model_gradient_forces and not own.model_gradient_forces
    via_model.model.load_state_dict(own.model.state_dict())
    own, via_model = own.double(), via_model.double()
    batch = Batch.from_data_list([frames[3], frames[44]])
    batch.pos, batch.cell = batch.pos.double(), batch.cell.double()
    a, b = own.predict_batch(batch), via_model.predict_batch(batch)
    torch.testing.assert_close(a["energy"], b["energy"])
    torch.testing.assert_close(a["forces"], b["forces"], rtol=1e-10, atol=1e-12)
    assert float(a["forces"].abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------
# training on real OC20 frames
# ---------------------------------------------------------------------------------------------


def test_training_on_oc20_frames_lowers_validation_force_mae(frames):
    """Even / odd frames of three real relaxations (interpolation along each relaxation): after 10
    short epochs the validation force MAE is far below the untrained one and below predicting zero."""
    import lightning as L

    from equiformer.tasks.datamodule import StructureDataModule

    L.seed_everything(0, verbose=False)
    items = torch.arange(len(frames))
    splits = {"train": items[items % 2 == 0], "val": items[items % 2 == 1]}
    dm = StructureDataModule(batch_size=4, dataset=frames, splits=splits)
    task = _task()
    trainer = _trainer(max_epochs=10)
    before = trainer.validate(task, datamodule=dm, verbose=False)[0]
    trainer.fit(task, datamodule=dm)
    after = {k: float(v) for k, v in trainer.callback_metrics.items()}
    val = dm.split_dataset("val")
    zero = 1000 * float(torch.cat([d.forces[~d.fixed] for d in val]).abs().mean())  # MAE of predicting F = 0
    assert after["val/force_mae_meV_per_A"] < 0.6 * before["val/force_mae_meV_per_A"]
    assert after["val/force_mae_meV_per_A"] < zero
    assert after["val/force_cos"] > before["val/force_cos"] + 0.2
    assert after["val/energy_mae_meV"] < 0.1 * before["val/energy_mae_meV"]
    assert 0.0 <= after["val/efwt"] <= 1.0
    # the statistics came from the training frames
    train_e = torch.stack([frames[int(i)].energy[0].double() for i in splits["train"]])  # float32 items
    assert float(task.energy_mean) == pytest.approx(float(train_e.mean()), abs=1e-5)
    assert float(task.energy_std) == pytest.approx(float(train_e.std()), abs=1e-5)


def test_trajectory_datamodule_fit_test_and_checkpoint(cache_root, tmp_path):
    import lightning as L

    from equiformer.tasks.energy_force import EnergyForceTask
    from equiformer.tasks.oc20_datamodule import OC20TrajectoryDataModule

    L.seed_everything(1, verbose=False)
    dm = OC20TrajectoryDataModule(root=str(cache_root), source=str(_need(TARBALL)), trajectories=LEARN_TRAJS + ["random1000141"],
                                  frame_stride=20, train_size=2, val_size=1, split_seed=0, batch_size=4)
    dm.setup()
    names = dm.trajectory_split()
    assert sorted(sum(names.values(), [])) == sorted(LEARN_TRAJS + ["random1000141"])
    assert [len(names[k]) for k in ("train", "val", "test")] == [2, 1, 1]
    ds = dm.dataset
    for k, items in dm.splits.items():  # frames of a relaxation stay in its trajectory's split
        assert {ds.names[t] for t in ds.frame_traj[items].tolist()} == set(names[k])
    task = _task(fit_references=True, ema_decay=0.9)
    trainer = _trainer(max_epochs=1, enable_checkpointing=True, default_root_dir=str(tmp_path))
    trainer.fit(task, datamodule=dm)
    assert task.atom_refs.abs().sum() > 0  # fitted per-element references
    res = trainer.test(task, datamodule=dm, verbose=False)[0]
    for key in ("test/energy_mae_meV", "test/force_mae_meV_per_A", "test/force_cos", "test/efwt", "test/mae_norm"):
        assert math.isfinite(res[key]), key
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    loaded = EnergyForceTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    assert float(loaded.energy_std) == float(task.energy_std) and torch.equal(loaded.atom_refs, task.atom_refs)
    batch = Batch.from_data_list([ds[0], ds[1]])
    task.eval()
    loaded.eval()
    torch.testing.assert_close(loaded.predict_step(batch)["forces"], task.predict_step(batch)["forces"])


def test_md17_style_molecules():
    """Molecules (no cell, no fixed atoms, no tags): ethanol and malonaldehyde-like MD17 systems from
    ASE's G2 geometries, rattled, with EMT energies and forces; energy+force training runs and learns."""
    import lightning as L
    from ase.build import molecule
    from ase.calculators.emt import EMT

    from equiformer.data import from_ase
    from equiformer.tasks.datamodule import StructureDataModule

    L.seed_everything(0, verbose=False)
    rng = np.random.default_rng(0)
    datas = []
    for name in ("CH3CH2OH", "CH3CHO"):
        for _ in range(16):
            m = molecule(name)
            m.positions += rng.normal(scale=0.08, size=m.positions.shape)
            m.calc = EMT()
            m.get_potential_energy()
            datas.append(from_ase(m))
    for d in datas:
        del d.source, d.name  # plain tensors only
    idx = torch.arange(len(datas))
    dm = StructureDataModule(batch_size=4, dataset=datas, splits={"train": idx[idx % 4 != 0], "val": idx[idx % 4 == 0]})
    task = _task(model_kwargs=dict(TINY, cutoff=3.0), energy_target="per_atom", fit_references=True, lr=5e-3)
    trainer = _trainer(max_epochs=10)
    before = trainer.validate(task, datamodule=dm, verbose=False)[0]
    trainer.fit(task, datamodule=dm)
    after = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert after["val/force_mae_meV_per_A"] < 0.7 * before["val/force_mae_meV_per_A"]
    assert after["val/force_cos"] > 0.5 > before["val/force_cos"]
    assert math.isfinite(after["val/energy_mae_meV_per_atom"])


def test_energy_only_training_needs_no_forces():
    from ase.build import molecule

    from equiformer.data import from_ase
    from equiformer.tasks.datamodule import StructureDataModule

    datas = []
    for k, name in enumerate(("H2O", "NH3", "CH4", "CH3OH")):
        d = from_ase(molecule(name))
        datas.append(Data(z=d.z, pos=d.pos, cell=d.cell, pbc=d.pbc, energy=torch.tensor([-10.0 * (k + 1)])))
    idx = torch.arange(4)
    dm = StructureDataModule(batch_size=2, dataset=datas, splits={"train": idx, "val": idx})
    task = _task(force_weight=0.0, gradient_forces=True)
    assert not task.use_forces
    trainer = _trainer(max_epochs=1)
    trainer.fit(task, datamodule=dm)
    assert "val/force_mae_meV_per_A" not in trainer.callback_metrics
    with pytest.raises(ValueError, match="no 'forces' but force_weight > 0"):
        _task(normalization={"energy_mean": 0.0, "energy_std": 1.0}).training_step(Batch.from_data_list(datas[:2]), 0)


# ---------------------------------------------------------------------------------------------
# statistics, options, configs
# ---------------------------------------------------------------------------------------------


def test_statistics_fast_path_and_reference_fit(cache_root):
    from equiformer.datasets.oc20 import OC20Trajectories
    from equiformer.tasks.energy_force import NUM_ELEMENTS, energy_force_statistics

    frames64 = OC20Trajectories(root=cache_root, source=_need(TARBALL), trajectories=LEARN_TRAJS, frame_stride=2,
                                max_frames_per_trajectory=20, dtype=torch.float64)  # items as stored: float64
    sub = Subset(frames64, list(range(3, 50, 2)))
    fast = energy_force_statistics(sub, energy_target="per_atom", fit_references=True)

    class Plain(torch.utils.data.Dataset):  # no energy_force_arrays: the generic path builds every item
        def __len__(self):
            return len(sub)

        def __getitem__(self, i):
            return sub[i]

    slow = energy_force_statistics(Plain(), energy_target="per_atom", fit_references=True)
    for k in ("energy_mean", "energy_std", "force_rms", "avg_num_atoms"):
        assert fast[k] == pytest.approx(slow[k], rel=1e-10), k
    torch.testing.assert_close(fast["atom_refs"], slow["atom_refs"])
    # the reference fit is the least-squares solution over the element counts
    items = [sub[i] for i in range(len(sub))]
    counts = np.stack([np.bincount(d.z.numpy(), minlength=NUM_ELEMENTS) for d in items]).astype(float)
    e = np.array([float(d.energy) for d in items])
    present = counts.sum(0) > 0
    ref = np.linalg.lstsq(counts[:, present], e, rcond=None)[0]
    resid = (e - counts[:, present] @ ref) / counts.sum(1)
    assert fast["energy_mean"] == pytest.approx(resid.mean(), abs=1e-6)
    np.testing.assert_allclose(counts[:, present] @ fast["atom_refs"].numpy()[present], counts[:, present] @ ref, atol=1e-6)
    free = torch.cat([d.forces[~d.fixed] for d in items]).double()
    assert fast["force_rms"] == pytest.approx(float(free.pow(2).mean().sqrt()), rel=1e-6)


def test_options_are_checked():
    with pytest.raises(ValueError, match="energy_target"):
        _task(energy_target="per_molecule")
    with pytest.raises(ValueError, match="force_loss"):
        _task(force_loss="huber")
    with pytest.raises(ValueError, match="not both 0"):
        _task(energy_weight=0.0, force_weight=0.0)
    with pytest.raises(ValueError, match="positive stds"):
        _task(normalization={"energy_mean": 0.0, "energy_std": 0.0})
    task = _task()
    with pytest.raises(ValueError, match="no normalisation statistics"):
        task.setup("fit")


@pytest.fixture
def eqv2_registered(monkeypatch):
    from equiformer.models import MODEL_REGISTRY

    try:
        import equiformer.models.equiformer_v2  # noqa: F401
    except ImportError:
        pytest.skip("EquiformerV2 is not available")
    if "equiformer_v2" not in MODEL_REGISTRY:
        monkeypatch.setitem(MODEL_REGISTRY, "equiformer_v2", ("equiformer.models.equiformer_v2:EquiformerV2", {}))


def test_equiformer_v2_direct_and_gradient_forces(eqv2_registered, frames):
    norm = {"energy_mean": -200.0, "energy_std": 100.0, "force_std": 0.3}
    direct = _task(model="equiformer_v2", model_kwargs={"preset": "small", "num_layers": 1, "cutoff": 4.0}, normalization=norm)
    assert not direct.gradient_forces  # the model's config says direct_forces
    batch = Batch.from_data_list([frames[0], frames[21]])
    out = direct.model(batch)
    res = direct.predict_batch(batch)
    torch.testing.assert_close(res["forces"], out["forces"] * 0.3)  # direct head: normalised forces x force_std
    loss = direct.loss_terms(batch, direct.predict_batch(batch, create_graph=True))["loss"]
    loss.backward()
    assert all(p.grad is not None for p in direct.model.force_head.parameters() if p.requires_grad)
    conservative = _task(model="equiformer_v2", model_kwargs={"preset": "small", "num_layers": 1, "cutoff": 4.0,
                                                              "direct_forces": False}, normalization=norm).double().eval()
    assert conservative.gradient_forces and conservative.model_gradient_forces
    batch.pos, batch.cell = batch.pos.double(), batch.cell.double()
    res = conservative.predict_batch(batch)
    h = 1e-5
    plus, minus = batch.clone(), batch.clone()
    plus.pos[5, 1] += h
    minus.pos[5, 1] -= h
    de = (conservative.predict_batch(plus)["energy"][0] - conservative.predict_batch(minus)["energy"][0]) / (2 * h)
    assert float(res["forces"][5, 1]) == pytest.approx(-float(de), rel=1e-4, abs=1e-7)


def test_oc20_trajectory_config_runs(cache_root, tmp_path):
    """configs/oc20/equiformer_small_s2ef_trajectories.yaml through the CLI (1 step, tiny data)."""
    from equiformer.tasks.energy_force_cli import EnergyForceCLI

    cfg = ROOT / "configs" / "oc20" / "equiformer_small_s2ef_trajectories.yaml"
    cli = EnergyForceCLI(["fit", "--config", str(cfg), "--data.init_args.root", str(cache_root),
                          "--data.init_args.source", str(_need(TARBALL)), "--data.init_args.trajectories", "3",
                          "--data.init_args.frame_stride", "60", "--data.init_args.train_size", "1",
                          "--data.init_args.val_size", "1", "--data.init_args.num_workers", "0",
                          "--data.init_args.cover_elements", "false",  # 3 systems cannot cover each other
                          "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", str(tmp_path),
                          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                          "--model.model_kwargs", json.dumps(TINY)])  # the config's own model: built below
    assert cli.model.hparams.force_weight == 100.0 and cli.model.gradient_forces
    assert cli.model.hparams.fit_references and cli.model.hparams.force_normalization == "energy_std"
    assert math.isfinite(float(cli.trainer.callback_metrics["val/force_mae_meV_per_A"]))
    import yaml

    from equiformer.models import build_model

    model_cfg = yaml.safe_load(cfg.read_text())["model"]
    model = build_model(model_cfg["model"], **model_cfg["model_kwargs"])
    assert model.config["num_layers"] == 3 and model.config["avg_num_nodes"] == pytest.approx(77.81317)


@pytest.mark.parametrize("name", ["equiformer_v2_small_s2ef_trajectories", "equiformer_v2_s2ef_2M", "equiformer_v2_s2ef_200k"])
def test_equiformer_v2_configs_parse(eqv2_registered, name):
    import yaml

    from equiformer.models import build_model
    from equiformer.models.equiformer_v2 import PRESETS

    cfg = yaml.safe_load((ROOT / "configs" / "oc20" / f"{name}.yaml").read_text())
    kwargs = cfg["model"]["model_kwargs"]
    assert kwargs["preset"] in PRESETS
    if kwargs["preset"] == "small":
        model = build_model(cfg["model"]["model"], **kwargs)
        assert model.config["direct_forces"] is True and model.config["max_neighbors"] == 20
    init = cfg["data"]["init_args"]
    assert cfg["data"]["class_path"].startswith("equiformer.tasks.oc20_datamodule.")
    if "train" in init:  # the LMDB layout written by equiformer.datasets.download
        assert init["train"].startswith("data/oc20/s2ef/") and init["val"] == "data/oc20/s2ef/all/val_id"
    assert cfg["trainer"]["inference_mode"] is False


@pytest.mark.parametrize("value, expected", [
    (200, "00:00:03:20"), ("200", "00:00:03:20"), ("00:00:00:200", "00:00:03:20"), ("3:20", "00:00:03:20"),
    ("01:30:00", "00:01:30:00"), (90061.2, "01:01:01:02"), ("00:01:00:00", "00:01:00:00"),
    (None, None), ({"seconds": 5}, {"seconds": 5}),
])
def test_max_time_is_normalised_for_lightning(value, expected):
    """A seconds budget or an over-full DD:HH:MM:SS becomes a duration Lightning's Timer accepts."""
    from lightning.pytorch.callbacks import Timer

    from equiformer.tasks.energy_force_cli import normalize_max_time

    out = normalize_max_time(value)
    assert out == expected
    if isinstance(out, str):
        Timer(duration=out)  # raises MisconfigurationException on a malformed string


@pytest.mark.parametrize("bad", ["soon", "1:2:3:4:5", -3, True, "00:00:-1:00"])
def test_max_time_rejects_non_durations(bad):
    from equiformer.tasks.energy_force_cli import normalize_max_time

    with pytest.raises(ValueError, match="max_time"):
        normalize_max_time(bad)


@pytest.mark.parametrize("max_time", ["200", "00:00:00:200"])
def test_cli_accepts_seconds_as_max_time(max_time, tmp_path):
    """--trainer.max_time as a script would pass it: the Trainer gets a 200 s Timer (no data is read)."""
    from lightning.pytorch.callbacks import Timer

    from equiformer.tasks.energy_force_cli import EnergyForceCLI

    cfg = ROOT / "configs" / "oc20" / "equiformer_small_s2ef_trajectories.yaml"
    cli = EnergyForceCLI(["--config", str(cfg), "--trainer.max_time", max_time, "--trainer.default_root_dir", str(tmp_path),
                          "--trainer.enable_progress_bar", "false", "--model.model_kwargs", json.dumps(TINY)], run=False)
    timers = [c for c in cli.trainer.callbacks if isinstance(c, Timer)]
    assert len(timers) == 1 and timers[0]._duration == 200.0


def test_gpu_eqv2_script_passes_a_valid_max_time(tmp_path):
    """benchmarks/gpu_eqv2.sh's train stage builds its CLI arguments (parsed, printed, not run): the
    max_time it passes must satisfy Lightning's own DD:HH:MM:SS check (the H100 run failed on '00:00:00:200')."""
    import re
    import shutil
    import subprocess
    import sys

    import yaml
    from lightning.pytorch.callbacks import Timer

    if shutil.which("bash") is None:
        pytest.skip("bash not available")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               SKIP_INSTALL="1", STAGES="train", TRAIN_EXTRA="--print_config", OUT=str(tmp_path))
    for name in ("TRAIN_S", "TRAIN_EPOCHS"):  # the script's own defaults for a training-only call
        env.pop(name, None)
    proc = subprocess.run(["bash", "benchmarks/gpu_eqv2.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = (tmp_path / "train_oc20.log").read_text()
    assert "train exit 0" in proc.stdout, proc.stdout + log[-2000:]
    printed = yaml.safe_load(log[log.index("seed_everything:"):])
    max_time = printed["trainer"]["max_time"]
    assert re.fullmatch(r"(\d+):(\d\d):(\d\d):(\d\d)", str(max_time)), max_time
    assert Timer(duration=max_time)._duration == 380.0
    assert printed["trainer"]["max_epochs"] == 7 and printed["model"]["max_epochs"] == 7


def test_zero_force_baseline_matches_the_metrics_of_a_zero_prediction(frames):
    """The reference printed next to every OC20 force MAE: F = 0 scored by EnergyForceMetrics over the
    task's atoms (free atoms only), the same via the fast array path and by building items."""
    from equiformer.tasks.energy_force import zero_force_baseline
    from equiformer.tasks.energy_force_metrics import EnergyForceMetrics

    sub = Subset(frames, list(range(1, 60, 3)))
    batch = Batch.from_data_list([sub[i] for i in range(len(sub))])
    task = _task(ema_decay=None)
    mask = task.force_mask(batch)
    assert 0 < int(mask.sum()) < batch.z.numel()  # real slabs: some atoms fixed, some free
    metrics = EnergyForceMetrics()
    metrics.update(batch.energy, batch.energy, torch.bincount(batch.batch), torch.zeros_like(batch.forces), batch.forces,
                   batch.batch, mask)
    expected = metrics.compute()

    class Plain(torch.utils.data.Dataset):  # no energy_force_arrays: the generic path
        def __len__(self):
            return len(sub)

        def __getitem__(self, i):
            return sub[i]

    for ds in (sub, Plain()):
        got = zero_force_baseline(ds)
        assert got["num_atoms"] == int(mask.sum())
        assert got["force_mae_meV_per_A"] == pytest.approx(float(expected["force_mae_meV_per_A"]), rel=1e-6)
        assert got["force_l2mae_meV_per_A"] == pytest.approx(float(expected["force_l2mae_meV_per_A"]), rel=1e-6)
    every = zero_force_baseline(sub, train_on_free_atoms=False)
    assert every["num_atoms"] == batch.z.numel()
    assert every["force_mae_meV_per_A"] == pytest.approx(1000 * float(batch.forces.double().abs().mean()), rel=1e-6)
    with pytest.raises(ValueError, match="empty"):
        zero_force_baseline(Subset(frames, []))


def test_max_train_force_drops_only_high_force_training_frames(cache_root):
    """max_train_force removes the training frames whose largest free-atom force exceeds it (checked
    frame by frame from the Data items), and leaves validation and test untouched."""
    from equiformer.tasks.oc20_datamodule import OC20TrajectoryDataModule, max_free_force

    kw = dict(root=str(cache_root), source=str(_need(TARBALL)), trajectories=LEARN_TRAJS + ["random1000141"],
              train_size=2, val_size=1, split_seed=1)
    full = OC20TrajectoryDataModule(**kw)
    train = full.split_dataset("train")
    fmax = torch.tensor([float(d.forces[~d.fixed].norm(dim=-1).max()) if (~d.fixed).any() else 0.0 for d in train])
    torch.testing.assert_close(max_free_force(full.dataset, torch.as_tensor(train.indices)), fmax.double())
    limit = float(fmax.median())
    cut = OC20TrajectoryDataModule(**kw, max_train_force=limit)
    assert len(cut.split_dataset("train")) == int((fmax <= limit).sum()) < len(train)
    kept = torch.as_tensor(cut.split_dataset("train").indices)
    assert set(kept.tolist()) == {i for i, f in zip(train.indices, fmax.tolist()) if f <= limit}
    for split in ("val", "test"):
        assert cut.split_dataset(split).indices == full.split_dataset(split).indices
    with pytest.raises(ValueError, match="max_train_force"):
        OC20TrajectoryDataModule(**kw, max_train_force=0.0)
    with pytest.raises(ValueError, match="removes every training frame"):
        OC20TrajectoryDataModule(**kw, max_train_force=1e-9).setup()
