"""n-body prediction (the GATr paper's benchmark): :class:`NBodyTask` + :class:`NBodyDataModule`.

The model maps the initial state of each system (``data.mass``, ``data.pos``, ``data.vel``)
to the positions after the simulated time (``out["pos"]``); the loss is the MSE against
``data.pos_final`` (mean over bodies and the three coordinates, the paper's metric).
AdamW with a linear warm-up and cosine decay stepped per optimizer step.

Evaluation sets (:mod:`equiformer.datasets.nbody`): ``val`` during training; at test time
``test`` (in distribution), ``objects`` (more planets than in training) and ``shifted``
(systems translated +200 along x). Logged as ``val/mse``, ``test/mse``, ``objects/mse``,
``shifted/mse``.

Models by name (:data:`NBODY_MODELS`): ``gatr``, ``transformer``, ``egnn``; any other name
goes to :func:`equiformer.models.build_model`, and ``"module:attribute"`` is imported.

Command line (LightningCLI)::

    python -m equiformer.tasks.nbody fit  --config configs/nbody/gatr.yaml
    python -m equiformer.tasks.nbody test --config configs/nbody/gatr.yaml --ckpt_path runs/.../last.ckpt
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from equiformer.datasets.nbody import NBodyConfig, NBodyDataset, NBodySplit, load_or_generate
from equiformer.tasks.schedulers import WarmupCosineLR

__all__ = ["NBODY_MODELS", "EVAL_SETS", "build_nbody_model", "NBodyTask", "NBodyDataModule", "main"]

#: short names of the n-body models -> "module:attribute"
NBODY_MODELS: dict[str, str] = {
    "gatr": "equiformer.models.gatr_nbody:GATrNBody",
    "transformer": "equiformer.models.baselines:NBodyTransformer",
    "egnn": "equiformer.models.baselines:NBodyEGNN",
}
#: test-time evaluation sets, in the order of :meth:`NBodyDataModule.test_dataloader`
EVAL_SETS = ("test", "objects", "shifted")


def build_nbody_model(name: str, **kwargs: Any) -> nn.Module:
    """``gatr`` / ``transformer`` / ``egnn``, a ``"module:attribute"`` path, or a registry name."""
    target = NBODY_MODELS.get(name, name)
    if ":" in target:
        module, _, attr = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import n-body model {target!r}: {e}") from None
        return cls(**kwargs)
    from equiformer.models import build_model

    return build_model(name, **kwargs)


class NBodyTask(L.LightningModule):
    """MSE regression of final positions.

    Args:
        model: name for :func:`build_nbody_model` (``gatr``, ``transformer``, ``egnn``, ...).
        model_kwargs: constructor arguments; after construction the hyper-parameters hold the
            model's full ``config``.
        lr: peak AdamW learning rate (paper: 3e-4).
        weight_decay: AdamW weight decay (paper: 0).
        warmup_steps: linear warm-up steps.
        min_lr_factor: final learning rate of the cosine as a fraction of ``lr`` (the paper
            decays to 1 %).
        total_steps: length of the cosine; default: the trainer's ``max_steps`` (or its
            estimated number of steps).
    """

    def __init__(
        self,
        model: str = "gatr",
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        min_lr_factor: float = 0.01,
        total_steps: int | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0 or not 0 <= min_lr_factor <= 1:
            raise ValueError(f"NBodyTask: need lr > 0 and 0 <= min_lr_factor <= 1, got {lr}, {min_lr_factor}")
        self.save_hyperparameters()
        self.model = build_nbody_model(model, **dict(model_kwargs or {}))
        config = getattr(self.model, "config", None)
        if isinstance(config, Mapping):
            self.hparams["model_kwargs"] = dict(config)
        self._t0: float | None = None

    def forward(self, data) -> dict[str, Tensor]:
        return self.model(data)

    def _mse(self, data) -> Tensor:
        pred = self.model(data)["pos"]
        return F.mse_loss(pred.float(), data.pos_final.float())

    def training_step(self, data, batch_idx: int) -> Tensor:
        loss = self._mse(data)
        bs = int(data.num_graphs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        now = time.perf_counter()
        if self._t0 is not None:
            self.log("train/systems_per_s", bs / max(now - self._t0, 1e-9), batch_size=bs)
        self._t0 = now
        return loss

    def validation_step(self, data, batch_idx: int) -> None:
        self.log("val/mse", self._mse(data), prog_bar=True, batch_size=int(data.num_graphs))

    def test_step(self, data, batch_idx: int, dataloader_idx: int = 0) -> None:
        name = EVAL_SETS[dataloader_idx]
        self.log(f"{name}/mse", self._mse(data), batch_size=int(data.num_graphs), add_dataloader_idx=False)

    def total_steps(self) -> int:
        if self.hparams.total_steps:
            return int(self.hparams.total_steps)
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        return max(int(trainer.estimated_stepping_batches), 1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr)
        scheduler = WarmupCosineLR(optimizer, warmup_steps=hp.warmup_steps, total_steps=self.total_steps(),
                                   min_lr=hp.lr * hp.min_lr_factor, warmup_start_lr=hp.lr * 0.01)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


class NBodyDataModule(L.LightningDataModule):
    """Generates (once, cached) and serves the n-body splits.

    ``train_size`` systems are the first ones of the seeded train split, so ``train_size=1000``
    is "1 % of the paper's 100,000" exactly as if the full split had been generated.

    Args:
        root: folder of the generated splits (``python -m equiformer.datasets.nbody --out``);
            default ``$EQUIFORMER_CACHE/nbody`` or ``~/.cache/equiformer/nbody``.
        seed: data seed (independent streams per split).
        train_size, val_size, test_size, generalization_size: systems per split
            (``objects`` and ``shifted`` have ``generalization_size`` each).
        batch_size, eval_batch_size: systems per batch (paper: 64 and 64).
        num_planets, generalization_planets, num_steps, softening, time: generator settings
            (:class:`equiformer.datasets.nbody.NBodyConfig`).
        generate_device: where to integrate while generating (``"cuda"`` is much faster for 100k).
        num_workers: DataLoader workers (0 is best: a batch is one tensor slice).
    """

    def __init__(
        self,
        root: str | None = None,
        seed: int = 0,
        train_size: int = 1000,
        val_size: int = 5000,
        test_size: int = 5000,
        generalization_size: int = 5000,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_planets: int = 3,
        generalization_planets: int = 5,
        num_steps: int = 1000,
        softening: float = 0.01,
        time: float = 0.1,
        generate_device: str = "cpu",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = NBodyConfig(num_planets=num_planets, generalization_planets=generalization_planets,
                                  num_steps=num_steps, softening=softening, time=time)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size,
                      "objects": generalization_size, "shifted": generalization_size}
        for k, v in self.sizes.items():
            if v < 0:
                raise ValueError(f"NBodyDataModule: {k} size must be >= 0, got {v}")
        self.splits: dict[str, NBodySplit] = {}

    def _load(self, name: str) -> NBodySplit:
        hp = self.hparams
        d = load_or_generate(name, self.sizes[name], self.config, hp.seed, root=hp.root, device=hp.generate_device)
        return NBodySplit.from_dict(d, name)

    def prepare_data(self) -> None:
        for name in self.sizes:
            if self.sizes[name] > 0:
                self._load(name)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": EVAL_SETS}.get(stage or "", tuple(self.sizes))
        for name in wanted:
            if name not in self.splits and self.sizes[name] > 0:
                self.splits[name] = self._load(name)

    def split(self, name: str) -> NBodySplit:
        if name not in self.splits:
            if self.sizes.get(name, 0) <= 0:
                raise ValueError(f"n-body split {name!r} has size 0 in this datamodule")
            self.splits[name] = self._load(name)
        return self.splits[name]

    def _loader(self, name: str, train: bool) -> DataLoader:
        ds = NBodyDataset(self.split(name))
        hp = self.hparams
        if train:
            g = torch.Generator().manual_seed(hp.seed + 1)
            sampler = BatchSampler(RandomSampler(ds, generator=g), hp.batch_size, drop_last=len(ds) >= hp.batch_size)
        else:
            sampler = BatchSampler(SequentialSampler(ds), hp.eval_batch_size, drop_last=False)
        return DataLoader(ds, batch_size=None, sampler=sampler, num_workers=hp.num_workers,
                          persistent_workers=hp.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(name, False) for name in EVAL_SETS]


def main(argv: list[str] | None = None) -> None:
    """LightningCLI over :class:`NBodyTask` and :class:`NBodyDataModule` (``fit``/``validate``/``test``)."""
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(NBodyTask, NBodyDataModule, args=argv, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
