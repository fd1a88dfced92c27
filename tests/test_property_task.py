"""PropertyTask on real QM9 molecules: normalisation, schedule, EMA, training, checkpoints, exact resume.

The network is the Equiformer ``small`` preset cut to one block of narrow irreps so that
each test trains in seconds on one CPU core; the data are the first 1,000 (or 300)
molecules of QM9 from ``qm9pack``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("lightning")
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

from equiformer.tasks.datamodule import QM9DataModule  # noqa: E402
from equiformer.tasks.ema import EMAWeights  # noqa: E402
from equiformer.tasks.metrics import PerTargetMAE, mae_key, unit_slug  # noqa: E402
from equiformer.tasks.property import NUM_ELEMENTS, PropertyTask  # noqa: E402
from equiformer.tasks.schedulers import WarmupCosineLR  # noqa: E402

#: the "small" preset cut down to CPU-test size (one block, narrow irreps, attention dropout on)
TINY = dict(
    preset="small", num_layers=1, irreps_node="16x0e+4x1e+2x2e", irreps_head="8x0e+2x1e+1x2e", num_heads=2,
    irreps_mlp_mid="32x0e+8x1e+4x2e", irreps_feature="32x0e", num_basis=16, radial_hidden=[16], alpha_drop=0.2,
)


pytestmark = pytest.mark.usefixtures("one_thread_module")


def _trainer(root, epochs, callbacks=(), **kw):
    return pl.Trainer(max_epochs=epochs, default_root_dir=str(root), accelerator="cpu", devices=1,
                      enable_progress_bar=False, enable_model_summary=False, logger=False,
                      callbacks=list(callbacks), **kw)


# ----------------------------------------------------------------------------- pieces


def test_warmup_cosine_schedule_shape_and_state():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = WarmupCosineLR(opt, warmup_steps=10, total_steps=110, min_lr=1e-6, warmup_start_lr=1e-7)
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-7)
    assert lrs[5] == pytest.approx(1e-7 + (1e-3 - 1e-7) * 0.5)
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)  # half-way through the cosine
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))  # decays monotonically
    assert lrs[110] == pytest.approx(1e-6) and lrs[119] == pytest.approx(1e-6)

    # the state is plain numbers and a restored scheduler continues the same curve
    state = sched.state_dict()
    json.dumps(state)
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched2 = WarmupCosineLR(opt2, warmup_steps=0, total_steps=1)
    sched2.load_state_dict(state)
    assert sched2.lr_at(37) == sched.lr_at(37) and sched2.total_steps == 110


def test_schedule_rejects_bad_lengths():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosineLR(opt, warmup_steps=0, total_steps=0)


def test_ema_follows_the_formula():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMAWeights(net, decay=0.9)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    expected = {k: v.clone() for k, v in start.items() if v.is_floating_point()}
    for n in range(15):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()
        net(torch.randn(8, 3))  # moves the BatchNorm running statistics
        d = min(0.9, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d)
        ema.update(net)
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                expected[k] = d * expected[k] + (1 - d) * v
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)
        else:  # counters are copied
            assert torch.equal(v, net.state_dict()[k])
    assert int(ema.num_updates) == 15
    assert all(not p.requires_grad for p in ema.parameters())
    with pytest.raises(ValueError, match="decay"):
        EMAWeights(net, decay=1.0)


def test_per_target_mae_and_metric_names():
    m = PerTargetMAE(2, scales=[1000.0, 1.0])
    a, b = torch.tensor([[0.1, 2.0], [0.3, -1.0]]), torch.tensor([[0.2, 0.5]])
    m.update(a.abs())
    m.update(b.abs())
    expected = torch.cat([a, b]).abs().mean(0).double() * torch.tensor([1000.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(m.compute(), expected)
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        m.update(torch.zeros(3, 3))
    assert mae_key("homo", "meV") == "homo_mae_meV"
    assert mae_key("alpha", "a0^3") == "alpha_mae_a03"
    assert unit_slug("cal/mol K") == "cal_mol_K"


# ----------------------------------------------------------------------------- normalisation


def test_normalisation_round_trip_on_qm9(qm9_root):
    targets = ["mu", "homo", "U0"]
    dm = QM9DataModule(root=qm9_root, targets=targets, subset=1000, batch_size=64, progress=False)
    dm.setup()
    stats, atomrefs = dm.train_statistics(), dm.atomrefs()
    task = PropertyTask(model_kwargs=TINY, targets=targets, ema_decay=None,
                        normalization={"mean": stats["mean"], "std": stats["std"], "atomref": atomrefs})
    batch = next(iter(dm.train_dataloader()))

    # atomref sums computed atom by atom from the datamodule's table
    ref = torch.zeros(batch.num_graphs, len(targets), dtype=torch.float64)
    for i, (z, g) in enumerate(zip(batch.z.tolist(), batch.batch.tolist())):
        ref[g] += atomrefs[:, z]
    torch.testing.assert_close(task.atomref_sum(batch), ref)
    assert ref[:, 2].abs().min() > 100.0 and ref[:, :2].abs().max() == 0.0  # only U0 has references

    y = batch.y.double()
    norm = task.normalize(batch.y, batch)
    torch.testing.assert_close(norm, (y - ref - stats["mean"]) / stats["std"])
    torch.testing.assert_close(task.denormalize(norm, batch), y, rtol=1e-12, atol=1e-9)
    # zero output = training mean (+ atomrefs)
    torch.testing.assert_close(task.denormalize(torch.zeros(batch.num_graphs, 3), batch), stats["mean"] + ref)

    # over the whole training split the normalised targets are standardised
    all_norm = torch.cat([task.normalize(b.y, b) for b in dm.train_dataloader()])
    assert all_norm.shape == (len(dm.splits["train"]), 3)
    assert all_norm.mean(0).abs().max() < 1e-3 and (all_norm.std(0) - 1).abs().max() < 1e-3

    hp = task.hparams["normalization"]
    assert len(hp["atomref"]) == 3 and len(hp["atomref"][0]) == NUM_ELEMENTS
    json.dumps(hp)


def test_bad_arguments_are_clear(qm9_root):
    with pytest.raises(ValueError, match="unknown loss"):
        PropertyTask(model_kwargs=TINY, targets=["homo"], loss="huber")
    with pytest.raises(ValueError, match="one mean and one std per target"):
        PropertyTask(model_kwargs=TINY, targets=["homo", "lumo"], normalization={"mean": [0.0], "std": [1.0]})
    with pytest.raises(ValueError, match="std positive"):
        PropertyTask(model_kwargs=TINY, targets=["homo"], normalization={"mean": [0.0], "std": [0.0]})
    with pytest.raises(ValueError, match="disagrees"):
        PropertyTask(model_kwargs={**TINY, "num_targets": 3}, targets=["homo"])
    # task and datamodule must agree on the targets
    dm = QM9DataModule(root=qm9_root, targets=["lumo"], subset=1000, progress=False)
    task = PropertyTask(model_kwargs=TINY, targets=["homo"])
    with pytest.raises(ValueError, match=r"differ from the datamodule's \['lumo'\]"):
        _trainer("unused", 1, limit_train_batches=1).fit(task, dm)


# ----------------------------------------------------------------------------- training + checkpoints


class _Record(Callback):
    def __init__(self):
        self.val_loss, self.val_mae, self.lr = [], [], []

    def on_train_epoch_end(self, trainer, pl_module):  # after this epoch's validation
        self.val_loss.append(float(trainer.callback_metrics["val/loss"]))
        self.val_mae.append(float(trainer.callback_metrics["val/U0_mae_meV"]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lr.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_training_lowers_val_loss_and_checkpoint_is_plain(qm9_root, tmp_path):
    pl.seed_everything(0)
    dm = QM9DataModule(root=qm9_root, targets=["U0"], subset=1000, batch_size=32, progress=False)
    task = PropertyTask(model_kwargs=TINY, targets=["U0"], lr=2e-3, warmup_epochs=0.25, ema_decay=0.99)
    rec = _Record()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/mae_norm", save_last=True)
    _trainer(tmp_path, 3, callbacks=[rec, ckpt_cb]).fit(task, dm)

    assert len(rec.val_loss) == 3
    assert rec.val_loss[-1] < rec.val_loss[0], rec.val_loss
    # and it beats predicting the training mean (the L1 of the normalised val targets)
    baseline = float(torch.cat([task.normalize(b.y, b) for b in dm.val_dataloader()]).abs().mean())
    assert rec.val_loss[-1] < 0.9 * baseline, (rec.val_loss, baseline)
    # val/loss is the L1 in std units, so the MAE in meV = loss * std * 1000
    std = float(dm.train_statistics()["std"][0])
    assert rec.val_mae[-1] == pytest.approx(rec.val_loss[-1] * std * 1000, rel=1e-4)
    # warm-up (27 batches/epoch -> 7 steps) then cosine decay to the minimum
    assert rec.lr[0] == pytest.approx(1e-6) and max(rec.lr) == pytest.approx(2e-3, rel=0.05)
    assert rec.lr[-1] < 1e-4 and rec.lr.index(max(rec.lr)) in range(5, 10)

    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    json.dumps(hp)  # everything needed for inference as plain JSON
    assert hp["targets"] == ["U0"] and hp["model"] == "equiformer"
    assert hp["model_kwargs"] == task.model.config and hp["model_kwargs"]["num_targets"] == 1
    assert hp["target_info"]["U0"]["unit"] == "eV" and hp["target_info"]["U0"]["report_unit"] == "meV"
    stats = dm.train_statistics()
    assert hp["normalization"]["mean"] == stats["mean"].tolist() and hp["normalization"]["std"] == stats["std"].tolist()
    assert hp["normalization"]["atomref"] == dm.atomrefs().tolist()
    assert any(k.startswith("ema.module.") for k in ckpt["state_dict"])

    meta = PropertyTask.export_metadata(hp)
    assert meta["model"] == {"name": "equiformer", "config": task.model.config}
    assert meta["targets"][0]["name"] == "U0" and meta["targets"][0]["unit"] == "eV"
    assert meta["normalization"]["std"] == stats["std"].tolist()
    assert sorted(meta["atomref"]["U0"], key=int) == ["1", "6", "7", "8", "9"]  # H C N O F free-atom energies

    # the reloaded task (no pickled code) predicts what the trained one predicts, with EMA weights
    loaded = PropertyTask.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    batch = next(iter(dm.val_dataloader()))
    task.eval()
    pred = loaded.predict_properties(batch)
    torch.testing.assert_close(pred, task.predict_properties(batch))
    assert pred.dtype == torch.float64 and pred.shape == (batch.num_graphs, 1)
    ema_pred = task.denormalize(task.ema.module(batch)["y"], batch)
    torch.testing.assert_close(pred, ema_pred)
    raw_pred = task.denormalize(task.model(batch)["y"], batch)
    assert not torch.allclose(pred, raw_pred)  # EMA weights differ from the raw ones
    # the val MAE of the checkpoint's weights, from total energies, is the logged one
    err = torch.cat([(loaded.predict_properties(b) - b.y.double()).abs() for b in dm.val_dataloader()])
    assert float(err.mean()) * 1000 == pytest.approx(rec.val_mae[-1], rel=1e-4)


def _fit(root, qm9_root, epochs, ckpt_path=None):
    pl.seed_everything(0)
    dm = QM9DataModule(root=qm9_root, targets=["homo", "U0"], subset=300, batch_size=32, progress=False)
    # max_epochs fixes the cosine length, so the interrupted run schedules like the full one
    task = PropertyTask(model_kwargs=TINY, targets=["homo", "U0"], lr=2e-3, warmup_epochs=0.5, ema_decay=0.99,
                        max_epochs=2)
    trainer = _trainer(root, epochs, callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_last=True)],
                       gradient_clip_val=1.0)
    trainer.fit(task, dm, ckpt_path=ckpt_path)
    return task, trainer


def test_resume_is_exact(qm9_root, tmp_path):
    """2 epochs straight == 1 epoch, then a fresh process-like resume from last.ckpt for 1 more epoch."""
    straight, tr_a = _fit(tmp_path / "a", qm9_root, 2)
    _fit(tmp_path / "b", qm9_root, 1)
    resumed, tr_b = _fit(tmp_path / "b", qm9_root, 2, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))

    assert tr_a.global_step == tr_b.global_step == 16
    sa, sb = straight.state_dict(), resumed.state_dict()
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert int(sb["ema.num_updates"]) == 16
    oa, ob = tr_a.optimizers[0].state_dict(), tr_b.optimizers[0].state_dict()
    for i in oa["state"]:
        assert torch.equal(oa["state"][i]["exp_avg"], ob["state"][i]["exp_avg"])
        assert torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"])
    assert tr_a.lr_scheduler_configs[0].scheduler.state_dict() == tr_b.lr_scheduler_configs[0].scheduler.state_dict()
    assert not math.isnan(float(tr_b.callback_metrics["val/loss"]))


def test_target_minimum_travels_from_dataset_to_shipped_json():
    """A band gap's physical minimum (0 eV) goes dataset TargetInfo -> task hparams -> exported JSON,
    where equiformer.hub clamps predictions to it; targets without one get no key."""
    from equiformer.datasets.jarvis import JARVIS_LABELS
    from equiformer.datasets.materials_project import MP_LABELS as MP_TARGETS
    from equiformer.hub import denormalize

    assert MP_TARGETS["gap"].minimum == 0.0 and MP_TARGETS["e_form"].minimum is None
    assert JARVIS_LABELS["mbj_bandgap"].minimum == 0.0 and JARVIS_LABELS["formation_energy_peratom"].minimum is None
    task = PropertyTask(model="crystalformer", targets=["e_form", "gap"], model_kwargs={"preset": "small", "num_targets": 2},
                        normalization={"mean": [-1.0, 1.2], "std": [1.0, 1.5], "atomref": [[0.0] * NUM_ELEMENTS] * 2})
    task.set_target_info([MP_TARGETS["e_form"], MP_TARGETS["gap"]])
    meta = PropertyTask.export_metadata(json.loads(json.dumps(dict(task.hparams))))
    assert "minimum" not in meta["targets"][0] and meta["targets"][1]["minimum"] == 0.0
    meta.update(format_version=1, name="t", description="", dataset="MP")
    out = denormalize(torch.tensor([[-5.0, -5.0]]), torch.tensor([11, 17]), torch.tensor([0, 0]), meta)
    assert out[0, 0] < 0 and out[0, 1] == 0.0  # e_form may be negative, the gap is clamped


def test_eval_mae_and_predictions_use_the_clamped_gap():
    """The validation/test MAE is that of the predictions a user gets: gaps clamped at 0."""
    from types import SimpleNamespace

    from equiformer.datasets.materials_project import MP_LABELS

    task = PropertyTask(model="crystalformer", targets=["gap"], model_kwargs={"preset": "small", "num_targets": 1},
                        normalization={"mean": [1.0], "std": [2.0], "atomref": [[0.0] * NUM_ELEMENTS]})
    task.set_target_info([MP_LABELS["gap"]])
    batch = SimpleNamespace(z=torch.tensor([11, 17, 14, 14]), batch=torch.tensor([0, 0, 1, 1]), num_graphs=2,
                            y=torch.tensor([[0.0], [1.5]], dtype=torch.float64))
    pred_norm = torch.tensor([[-0.8], [0.0]])  # -> gap -0.6 eV (clamped to 0) and 1.0 eV
    torch.testing.assert_close(task.denormalize(pred_norm, batch), torch.tensor([[0.0], [1.0]], dtype=torch.float64))
    clamped = task._clamp_normalized(pred_norm, batch)
    torch.testing.assert_close(clamped, torch.tensor([[-0.5], [0.0]]))
    task.set_target_info({"gap": {"unit": "eV"}})  # no minimum: nothing is clamped
    assert task._clamp_normalized(pred_norm, batch) is pred_norm
    assert task.denormalize(pred_norm, batch)[0, 0] == pytest.approx(-0.6)
