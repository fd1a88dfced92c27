"""Per-atom vs per-molecule normalisation of QM9 targets (PropertyTask, export, hub/api de-normalisation).

Extensive targets (U0 after the free-atom references) are learnt as
``(y - N * mean_per_atom) / std``, intensive ones (HOMO, ...) as ``(y - mean) / std``. The
statistics are checked against numpy on the first 1,000 QM9 molecules, the task's and the
shipped-model path's de-normalisation against each other, and the shipped ``qm9-equiformer``
(a JSON from before the option) against the formula it was exported with.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch_geometric.data import Batch

pytest.importorskip("lightning")
if importlib.util.find_spec("qm9pack") is None:
    pytest.skip("qm9pack not installed", allow_module_level=True)
import lightning.pytorch as pl  # noqa: E402

from equiformer import hub  # noqa: E402
from equiformer.data import from_smiles  # noqa: E402
from equiformer.datasets.qm9 import QM9  # noqa: E402
from equiformer.tasks.datamodule import QM9DataModule, target_statistics  # noqa: E402
from equiformer.tasks.property import PropertyTask  # noqa: E402
from pretrained_helpers import TINY_CONFIG, train_tiny_qm9_checkpoint  # noqa: E402

HARTREE_TO_EV = 27.211386246
#: free-atom U0 of the QM9 paper (Hartree), written out here independently of the package
U0_FREE_ATOM = {1: -0.500273, 6: -37.846772, 7: -54.583861, 8: -75.064579, 9: -99.718730}
SMILES = ["C", "O", "N", "CCO", "c1ccncc1", "FC(F)F"]


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def dm(qm9_root):
    m = QM9DataModule(root=qm9_root, targets=["homo", "U0", "zpve"], subset=1000, batch_size=64, progress=False)
    m.setup()
    return m


class ZeroNet(nn.Module):
    """A 'network' whose normalised output is always zero."""

    def __init__(self, num_targets: int):
        super().__init__()
        self.num_targets = num_targets
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, batch):
        return {"y": torch.zeros(batch.num_graphs, self.num_targets) + 0 * self.p}


def _numpy_reference(dm: QM9DataModule) -> tuple[np.ndarray, np.ndarray]:
    """(y' [M, 3] = homo, U0 - free atoms, zpve; N [M]) of the training split, item by item in float64."""
    ds = QM9(root=dm.root, subset=1000, dtype=torch.float64, progress=False)
    ys, ns = [], []
    for i in dm.splits["train"].tolist():
        d = ds[i]
        z = d.z.tolist()
        u0 = float(d.y[0, 7]) - sum(U0_FREE_ATOM[a] * HARTREE_TO_EV for a in z)
        ys.append([float(d.y[0, 2]), u0, float(d.y[0, 6])])
        ns.append(len(z))
    return np.array(ys), np.array(ns, dtype=np.float64)


# ----------------------------------------------------------------------------- statistics


def test_statistics_match_numpy_on_qm9(dm):
    y, n = _numpy_reference(dm)
    stats = dm.train_statistics(per_atom=[False, True, True])
    assert stats["mode"] == ["per_molecule", "per_atom", "per_atom"] and stats["count"] == len(n) == 840
    mpa = (y / n[:, None]).mean(0)
    resid = y - n[:, None] * mpa
    np.testing.assert_allclose(stats["mean_per_atom"][1:].numpy(), mpa[1:], rtol=1e-10)
    np.testing.assert_allclose(stats["std"][1:].numpy(), resid[:, 1:].std(0, ddof=1), rtol=1e-8)
    assert stats["mean"][1:].abs().max() == 0.0 and stats["mean_per_atom"][0] == 0.0
    # the intensive column keeps the per-molecule statistics, exactly those of the default call
    default = dm.train_statistics()
    np.testing.assert_allclose(stats["mean"][0].item(), y[:, 0].mean(), rtol=1e-10)
    assert torch.equal(stats["mean"][0], default["mean"][0]) and torch.equal(stats["std"][0], default["std"][0])
    assert torch.equal(default["mean_per_atom"], torch.zeros(3, dtype=torch.float64))
    # the point of it: U0's spread per molecule (eV) is several times the per-atom residual's
    assert default["std"][1] > 2.5 * stats["std"][1]


def test_target_statistics_refuses_bad_shapes():
    with pytest.raises(ValueError, match="3 molecules but 2 atom counts"):
        target_statistics(torch.zeros(3, 1), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="per_atom has 1 entries for 2 targets"):
        target_statistics(torch.zeros(3, 2), torch.tensor([1, 2, 3]), per_atom=[True])
    with pytest.raises(ValueError, match="at least one atom"):
        target_statistics(torch.zeros(2, 1), torch.tensor([0, 2]), per_atom=[True])


# ----------------------------------------------------------------------------- the task


def _fit(task, dm, steps=1, root="unused"):
    pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
               default_root_dir=root).fit(task, dm)


def test_auto_mode_round_trip_and_zero_output(dm):
    targets = ["homo", "U0", "zpve"]
    task = PropertyTask(model_kwargs=TINY_CONFIG, targets=targets, normalize="auto", ema_decay=None)
    _fit(task, dm)  # setup() takes the statistics and the extensive flags from the datamodule
    assert task.normalization_modes == ["per_molecule", "per_atom", "per_atom"]
    stats = dm.train_statistics(per_atom=[False, True, True])
    torch.testing.assert_close(task.target_mean_per_atom, stats["mean_per_atom"], rtol=0, atol=0)
    torch.testing.assert_close(task.target_std, stats["std"], rtol=0, atol=0)
    hp = task.hparams["normalization"]
    assert hp["mode"] == task.normalization_modes and len(hp["mean_per_atom"]) == 3
    json.dumps(hp)

    batch = next(iter(dm.val_dataloader()))
    y = batch.y.double()
    n = torch.bincount(batch.batch, minlength=batch.num_graphs).double()
    ref = task.atomref_sum(batch)
    norm = task.normalize(batch.y, batch)
    expected = (y - ref - stats["mean"] - n[:, None] * stats["mean_per_atom"]) / stats["std"]
    torch.testing.assert_close(norm, expected)
    torch.testing.assert_close(task.denormalize(norm, batch), y, rtol=1e-12, atol=1e-9)

    # over the training split the normalised per-atom targets have unit spread
    all_norm = torch.cat([task.normalize(b.y, b) for b in dm.train_dataloader()])
    assert (all_norm.std(0) - 1).abs().max() < 1e-3

    # a network that outputs zero predicts mean (intensive) and N * mean_per_atom + atomrefs (extensive)
    task.model = ZeroNet(3)
    pred = task.predict_properties(batch)
    torch.testing.assert_close(pred[:, 0], stats["mean"][0].expand(batch.num_graphs))
    torch.testing.assert_close(pred[:, 1], n * stats["mean_per_atom"][1] + ref[:, 1], rtol=1e-14, atol=1e-9)
    torch.testing.assert_close(pred[:, 2], n * stats["mean_per_atom"][2])
    assert ref[:, 1].abs().min() > 100.0  # U0's free-atom references were added back


def test_per_molecule_default_is_unchanged(dm):
    """normalize unset: the statistics and formula of earlier versions, bit for bit."""
    stats = dm.train_statistics()
    atomref = dm.atomrefs()
    task = PropertyTask(model_kwargs=TINY_CONFIG, targets=["homo", "U0", "zpve"], ema_decay=None,
                        normalization={"mean": stats["mean"], "std": stats["std"], "atomref": atomref})
    assert task.normalization_modes == ["per_molecule"] * 3
    batch = next(iter(dm.val_dataloader()))
    out = torch.randn(batch.num_graphs, 3, dtype=torch.float64)
    assert torch.equal(task.denormalize(out, batch), out * stats["std"] + stats["mean"] + task.atomref_sum(batch))
    assert torch.equal(task.normalize(batch.y, batch), (batch.y.double() - task.atomref_sum(batch) - stats["mean"]) / stats["std"])


def test_datamodule_without_per_atom_statistics_falls_back_to_its_split(qm9_root, dm):
    class OldDM(QM9DataModule):
        def train_statistics(self):  # the signature of datamodules that know no per-atom mode
            return super().train_statistics()

    old = OldDM(root=qm9_root, targets=["homo", "U0", "zpve"], subset=1000, batch_size=64, progress=False)
    task = PropertyTask(model_kwargs=TINY_CONFIG, targets=["homo", "U0", "zpve"], normalize={"U0": "per_atom"},
                        ema_decay=None)
    _fit(task, old)
    assert task.normalization_modes == ["per_molecule", "per_atom", "per_molecule"]
    stats = dm.train_statistics(per_atom=[False, True, False])
    # the fallback reads the float32 y of each item: agreement to float32 precision of U0 totals (~1e4 eV)
    torch.testing.assert_close(task.target_mean_per_atom, stats["mean_per_atom"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(task.target_std, stats["std"], rtol=1e-5, atol=1e-6)


def test_bad_normalize_arguments_are_clear():
    with pytest.raises(ValueError, match="unknown normalize='per_graph'"):
        PropertyTask(model_kwargs=TINY_CONFIG, targets=["homo"], normalize="per_graph")
    with pytest.raises(ValueError, match=r"normalize names \['U0'\], which are not targets"):
        PropertyTask(model_kwargs=TINY_CONFIG, targets=["homo"], normalize={"U0": "per_atom"})
    with pytest.raises(ValueError, match="modes must be one of"):
        PropertyTask(model_kwargs=TINY_CONFIG, targets=["homo"], normalize={"homo": "atom"})
    with pytest.raises(ValueError, match="was computed for"):
        PropertyTask(model_kwargs=TINY_CONFIG, targets=["homo"], normalize="per_atom",
                     normalization={"mean": [0.0], "std": [1.0], "mode": ["per_molecule"]})
    task = PropertyTask(model_kwargs=TINY_CONFIG, targets=["homo"], normalize="auto")
    with pytest.raises(ValueError, match="needs target metadata"):
        task.resolve_modes()


# ----------------------------------------------------------------------------- export, hub and api


@pytest.fixture(scope="module")
def per_atom_ckpt(tmp_path_factory):
    """A PropertyTask (tiny Equiformer, EMA) with U0 per atom, trained 3 steps on real QM9, saved by Lightning."""
    return train_tiny_qm9_checkpoint(tmp_path_factory.mktemp("ckpt_pa"), max_steps=3, normalize="auto")


def test_checkpoint_reload_keeps_the_per_atom_statistics(per_atom_ckpt):
    path, task, _ = per_atom_ckpt
    again = PropertyTask.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert again.normalization_modes == ["per_molecule", "per_atom"]
    assert torch.equal(again.target_mean_per_atom, task.target_mean_per_atom)
    assert float(task.target_mean_per_atom[1]) < -1.0  # U0 per atom, eV (atomization: about -4 eV/atom)


def test_export_writes_the_mode_and_predictor_agrees_with_the_task(per_atom_ckpt, tmp_path):
    path, task, _ = per_atom_ckpt
    js = hub.export_from_lightning(path, "tiny-pa", tmp_path)
    meta = json.loads(js.read_text())
    norm = meta["normalization"]
    assert norm["mode"] == ["per_molecule", "per_atom"]
    assert norm["mean_per_atom"] == [0.0, float(task.target_mean_per_atom[1])] and norm["mean"][1] == 0.0
    assert norm["std"] == task.target_std.tolist()
    assert meta["format_version"] == 2  # an equiformer that reads only version 1 refuses it rather than ignore the term

    from equiformer.api import Predictor

    batch = Batch.from_data_list([from_smiles(s) for s in SMILES])
    expected = task.predict_properties(batch).numpy()
    model, meta2 = hub.load_pretrained(js)
    got = Predictor([(model, meta2)], device="cpu").predict(SMILES)[["homo (eV)", "U0 (eV)"]].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-6)
    # without the per-atom term the JSON would mispredict methane's U0 by 5 atoms x mean_per_atom
    stripped = {**meta2, "normalization": {"mean": norm["mean"], "std": norm["std"]}}
    with torch.no_grad():
        out = model(batch)["y"].double()
    diff = hub.denormalize(out, batch.z, batch.batch, meta2) - hub.denormalize(out, batch.z, batch.batch, stripped)
    n = torch.bincount(batch.batch).double()
    torch.testing.assert_close(diff[:, 1], n * norm["mean_per_atom"][1])
    assert diff[:, 0].abs().max() == 0.0


def test_metadata_checks_the_new_fields(tmp_path):
    meta = {"name": "m", "model": {"name": "equiformer", "config": {}}, "targets": [{"name": "U0"}], "format_version": 2,
            "normalization": {"mean": [0.0], "std": [1.0], "mean_per_atom": [-4.2, 1.0]}}
    with pytest.raises(hub.PretrainedError, match="mean_per_atom must list one number per target"):
        hub.check_metadata(meta)
    meta["normalization"] = {"mean": [0.0], "std": [1.0], "mean_per_atom": [-4.2], "mode": ["atom"]}
    with pytest.raises(hub.PretrainedError, match="normalization.mode"):
        hub.check_metadata(meta)
    meta["normalization"]["mode"] = ["per_atom"]
    with pytest.raises(hub.PretrainedError, match="needs format_version 2"):
        hub.check_metadata({**meta, "format_version": 1})
    hub.check_metadata({**meta, "format_version": 2})


def test_shipped_qm9_model_predicts_exactly_as_before():
    """qm9-equiformer.json has no per-atom fields; its values are the pre-option formula's, bit for bit."""
    js = hub.PACKAGE_DIR / "qm9-equiformer.json"
    if not js.exists():
        pytest.skip("qm9-equiformer is not shipped in this checkout")
    from equiformer.api import LoadedModel

    model, meta = hub.load_pretrained(js)
    assert "mean_per_atom" not in meta["normalization"] and "mode" not in meta["normalization"]
    assert meta["format_version"] == 1
    batch = Batch.from_data_list([from_smiles(s) for s in SMILES])
    with torch.no_grad():
        out = model(batch)["y"].to(torch.float64)
        values = LoadedModel(model, meta).forward_values(batch)
    # the formula the file was exported for: out * std + mean + sum of atomrefs (index_add per atom)
    mean = torch.tensor(meta["normalization"]["mean"], dtype=torch.float64)
    std = torch.tensor(meta["normalization"]["std"], dtype=torch.float64)
    old = (out * std + mean).index_add(0, batch.batch, hub.atomref_table(meta)[batch.z])
    for k, t in enumerate(meta["targets"]):
        if t.get("minimum") is not None:
            old[:, k] = old[:, k].clamp(min=float(t["minimum"]))
    assert torch.equal(values, old)
    assert torch.equal(hub.denormalize(out, batch.z, batch.batch, meta), old)


def test_given_statistics_carry_their_mode(dm):
    """normalize unset + normalization with a mode (e.g. computed outside the task): the mode is taken as given."""
    stats = dm.train_statistics(per_atom=[False, True, True])
    task = PropertyTask(model_kwargs=TINY_CONFIG, targets=["homo", "U0", "zpve"], ema_decay=None,
                        normalization={**stats, "atomref": dm.atomrefs()})
    assert task.normalization_modes == ["per_molecule", "per_atom", "per_atom"]
    assert torch.equal(task.target_mean_per_atom, stats["mean_per_atom"])
