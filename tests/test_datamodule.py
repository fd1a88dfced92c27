"""QM9DataModule and StructureDataModule on a real 1,000-molecule QM9 subset."""

from __future__ import annotations

import importlib.util

import lightning as L
import numpy as np
import pytest
import torch
from torch_geometric.data import Data

if importlib.util.find_spec("qm9pack") is None:
    pytest.skip('qm9pack not installed (pip install "equiformer[qm9]")', allow_module_level=True)

from torch_geometric.datasets import qm9 as pyg_qm9  # noqa: E402

from equiformer.datasets import QM9  # noqa: E402
from equiformer.tasks.datamodule import QM9DataModule, StructureDataModule  # noqa: E402

N = 1000


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("qm9dm"))


@pytest.fixture(scope="module")
def dm(root) -> QM9DataModule:
    m = QM9DataModule(root=root, targets=["homo", "U0"], batch_size=16, eval_batch_size=50, subset=N, progress=False)
    m.prepare_data()
    m.setup("fit")
    return m


def test_split_sizes_and_disjointness(dm):
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sizes == {"train": 840, "val": 76, "test": 84} == dm.split_sizes()
    allidx = torch.cat(list(dm.splits.values()))
    assert torch.equal(allidx.sort().values, torch.arange(N))


def test_batches_carry_selected_targets(dm, root):
    full = QM9(root=root, subset=N, dtype=torch.float64, progress=False)
    assert dm.target_names == ["homo", "U0"] and [t.unit for t in dm.target_infos] == ["eV", "eV"]
    seen = []
    for batch in dm.val_dataloader():
        assert batch.y.shape == (batch.num_graphs, 2) and batch.y.dtype == torch.get_default_dtype()
        assert batch.cell.shape == (batch.num_graphs, 3, 3) and batch.pbc.shape == (batch.num_graphs, 3)
        assert batch.num_graphs <= 50
        expected = full.y_table[batch.idx][:, [2, 7]]
        assert torch.allclose(batch.y.double(), expected, rtol=1e-6, atol=0)
        seen.append(batch.idx)
    assert torch.equal(torch.cat(seen), dm.splits["val"])  # evaluation keeps the split's order
    train_idx = torch.cat([b.idx for b in dm.train_dataloader()])
    assert torch.equal(train_idx.sort().values, dm.splits["train"].sort().values)
    assert not torch.equal(train_idx, dm.splits["train"])  # shuffled
    first = next(iter(dm.train_dataloader()))
    assert first.num_graphs == 16 and first.z.dtype == torch.long


def test_worker_processes(root):
    m = QM9DataModule(root=root, targets="gap", subset=N, eval_batch_size=40, num_workers=1, progress=False)
    idx = torch.cat([b.idx for b in m.val_dataloader()])
    assert torch.equal(idx, m.splits["val"])


def test_train_statistics_independently(dm):
    stats = dm.train_statistics()
    assert stats["count"] == 840
    # recompute from the Data items and the QM9 paper's U0 free-atom energies (Hartree) x PyG's HAR2EV
    ref = {1: -0.500273, 6: -37.846772, 7: -54.583861, 8: -75.064579, 9: -99.718730}
    ref = {z: v * pyg_qm9.HAR2EV for z, v in ref.items()}
    sub = dm.split_dataset("train")
    ds = QM9(root=dm.root, subset=N, dtype=torch.float64, progress=False)
    vals = []
    for i in sub.indices:
        d = ds[i]
        vals.append([float(d.y[0, 2]), float(d.y[0, 7]) - sum(ref[int(z)] for z in d.z)])
    vals = np.array(vals)
    np.testing.assert_allclose(stats["mean"].numpy(), vals.mean(0), rtol=1e-10)
    np.testing.assert_allclose(stats["std"].numpy(), vals.std(0, ddof=1), rtol=1e-8)
    np.testing.assert_allclose(stats["mad"].numpy(), np.abs(vals - vals.mean(0)).mean(0), rtol=1e-8)
    assert stats["mean"].dtype == torch.float64


def test_atomrefs_table(dm):
    table = dm.atomrefs()
    assert table.shape == (2, 119) and table.dtype == torch.float64
    assert table[0].abs().sum() == 0  # homo has none
    assert torch.equal(table[1], QM9.atomref("U0"))


def test_subtract_atomref_mode(dm, root):
    sub = QM9DataModule(root=root, targets=["homo", "U0"], subset=N, subtract_atomref=True, progress=False)
    assert sub.atomrefs().abs().sum() == 0
    s1, s2 = dm.train_statistics(), sub.train_statistics()
    assert torch.allclose(s1["mean"], s2["mean"]) and torch.allclose(s1["std"], s2["std"])
    batch = next(iter(sub.val_dataloader()))
    totals = dm.qm9.y_table[batch.idx][:, 7]
    refs = dm.qm9.atomref_sums(["U0"])[batch.idx, 0]
    assert torch.allclose(batch.y[:, 1].double(), totals - refs, atol=1e-4)  # float32 of ~-50 eV values
    assert (batch.y[:, 1] < 0).all() and (batch.y[:, 1] > -150).all()


def test_explicit_and_fractional_sizes(root):
    assert QM9DataModule(root=root, subset=N, train_size=500, val_size=100).split_sizes() == {
        "train": 500, "val": 100, "test": 400}
    assert QM9DataModule(root=root, subset=N, train_size=0.5, val_size=0.25).split_sizes() == {
        "train": 500, "val": 250, "test": 250}
    assert QM9DataModule().split_sizes() == {"train": 110_000, "val": 10_000, "test": 10_831}
    with pytest.raises(ValueError, match="more than"):
        QM9DataModule(train_size=130_000, val_size=10_000)
    with pytest.raises(ValueError, match="subset"):
        QM9DataModule(subset=0)
    with pytest.raises(ValueError, match="unknown QM9 target"):
        QM9DataModule(targets=["homo", "enthalpy_of_nothing"])


def test_split_seed_changes_split(root):
    a = QM9DataModule(root=root, subset=N, progress=False)
    b = QM9DataModule(root=root, subset=N, split_seed=7, progress=False)
    assert not torch.equal(a.splits["train"], b.splits["train"])
    assert torch.equal(a.splits["train"], QM9DataModule(root=root, subset=N, progress=False).splits["train"])


def test_lightningcli_style_arguments(root):
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(QM9DataModule, "data")
    cfg = parser.parse_args(["--data.targets=[HOMO,gap]", f"--data.root={root}", f"--data.subset={N}",
                             "--data.batch_size=8"])
    m = QM9DataModule(**vars(cfg.data))
    assert m.target_names == ["homo", "gap"] and m.batch_size == 8
    cfg = parser.parse_args(["--data.targets=u0"])
    assert QM9DataModule(**vars(cfg.data)).target_names == ["U0"]


class _MeanByElement(L.LightningModule):
    """Tiny real model: y = per-element weights summed over atoms (learns from the batches)."""

    def __init__(self, num_targets: int) -> None:
        super().__init__()
        self.w = torch.nn.Embedding(10, num_targets)

    def forward(self, batch):
        out = torch.zeros(batch.num_graphs, self.w.embedding_dim, device=batch.z.device)
        return out.index_add(0, batch.batch, self.w(batch.z))

    def training_step(self, batch, _):
        return torch.nn.functional.l1_loss(self(batch), batch.y)

    def validation_step(self, batch, _):
        self.log("val_mae", torch.nn.functional.l1_loss(self(batch), batch.y), batch_size=batch.num_graphs)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def test_runs_inside_a_trainer(root):
    m = QM9DataModule(root=root, targets=["gap"], subset=N, batch_size=32, progress=False, subtract_atomref=True)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=5, limit_val_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")
    trainer.fit(_MeanByElement(1), datamodule=m)
    assert trainer.global_step == 5 and "val_mae" in trainer.callback_metrics
    assert m.hparams["subset"] == N and m.hparams["targets"] == ["gap"]


def test_generic_structure_datamodule():
    items = [Data(z=torch.tensor([1, 1]), pos=torch.tensor([[0.0, 0, 0], [0.74, 0, 0]]) * (1 + 0.01 * i),
                  y=torch.tensor([[float(i)]])) for i in range(10)]
    splits = {"train": torch.arange(6), "val": torch.tensor([6, 7]), "test": torch.tensor([8, 9])}
    m = StructureDataModule(batch_size=4, dataset=items, splits=splits)
    m.setup()
    assert sum(b.num_graphs for b in m.train_dataloader()) == 6
    assert torch.equal(next(iter(m.test_dataloader())).y[:, 0], torch.tensor([8.0, 9.0]))
    with pytest.raises(ValueError, match="indices outside"):
        StructureDataModule(dataset=items, splits={"train": torch.tensor([10])}).setup()
    with pytest.raises(ValueError, match="no split 'val'"):
        StructureDataModule(dataset=items, splits={"train": torch.arange(3)}).val_dataloader()
    with pytest.raises(ValueError, match="give dataset"):
        StructureDataModule().setup()
