"""Lightning DataModules that serve contract ``Data`` batches (PyG ``DataLoader``).

:class:`StructureDataModule` is the generic part (a map-style dataset of ``Data`` plus
named index splits -> train/val/test/predict loaders); a dataset-specific subclass builds
both in :meth:`StructureDataModule.build`. :class:`QM9DataModule` is the QM9 one.
All ``__init__`` arguments are plain typed values, so LightningCLI / YAML configs can set them.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torch_geometric.loader import DataLoader

from equiformer.datasets.qm9 import (
    QM9,
    QM9_NUM_MOLECULES,
    QM9_SPLIT_SIZES,
    qm9_atomrefs,
    qm9_target_info,
    resolve_qm9_targets,
)
from equiformer.datasets.splits import (
    DEFAULT_SPLIT_SEED,
    random_split_indices,
    resolve_split_sizes,
    scaled_split_sizes,
)
from equiformer.datasets.targets import TargetInfo

__all__ = ["QM9DataModule", "StructureDataModule"]


class StructureDataModule(L.LightningDataModule):
    """Train/val/test loaders over one dataset of contract ``Data`` and index splits.

    Either pass ``dataset`` and ``splits`` (``{"train": LongTensor, "val": ..., "test": ...}``)
    or subclass and override :meth:`build`. Training batches are shuffled; evaluation batches
    keep the split's order.

    Args:
        batch_size: graphs per training batch.
        eval_batch_size: graphs per val/test/predict batch (default ``batch_size``).
        num_workers: DataLoader worker processes (kept alive between epochs when > 0).
        pin_memory: pin host memory of batches (faster copies to a GPU).
        drop_last: drop the last incomplete training batch.
    """

    def __init__(
        self,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        dataset: Dataset | None = None,
        splits: dict[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        if int(batch_size) < 1 or (eval_batch_size is not None and int(eval_batch_size) < 1):
            raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}, eval_batch_size={eval_batch_size}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.drop_last = bool(drop_last)
        self._dataset = dataset
        self._splits = splits
        self._subsets: dict[str, Subset] = {}

    # -- building ---------------------------------------------------------------------------
    def build(self) -> tuple[Dataset, dict[str, Tensor]]:
        """Return ``(dataset, splits)``; subclasses override. Default: the constructor's."""
        if self._dataset is None or self._splits is None:
            raise ValueError(f"{type(self).__name__}: give dataset= and splits=, or override build()")
        return self._dataset, self._splits

    def setup(self, stage: str | None = None) -> None:
        if self._subsets:
            return
        dataset, splits = self.build()
        n = len(dataset)  # type: ignore[arg-type]
        for name, idx in splits.items():
            idx = torch.as_tensor(idx, dtype=torch.long)
            if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise ValueError(f"split {name!r} holds indices outside 0..{n - 1}")
            self._subsets[name] = Subset(dataset, idx.tolist())
        self._dataset, self._splits = dataset, {k: torch.as_tensor(v, dtype=torch.long) for k, v in splits.items()}

    @property
    def dataset(self) -> Dataset:
        """The whole dataset (builds it on first use)."""
        self.setup()
        assert self._dataset is not None
        return self._dataset

    @property
    def splits(self) -> dict[str, Tensor]:
        """``{split name: LongTensor of dataset indices}`` (builds on first use)."""
        self.setup()
        assert self._splits is not None
        return self._splits

    def split_dataset(self, name: str) -> Subset:
        """The dataset restricted to one split (``"train"``, ``"val"``, ``"test"``)."""
        self.setup()
        if name not in self._subsets:
            raise ValueError(f"{type(self).__name__} has no split {name!r}; it has {sorted(self._subsets)}")
        return self._subsets[name]

    # -- loaders ----------------------------------------------------------------------------
    def _loader(self, name: str, train: bool) -> DataLoader:
        return DataLoader(
            self.split_dataset(name),
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=self.drop_last if train else False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


class QM9DataModule(StructureDataModule):
    """QM9 (from qm9pack) with the standard random split, for property prediction.

    Batches hold ``y`` [B, T] with only the selected ``targets`` (units in
    :attr:`target_infos`: eV for energies, which are totals unless ``subtract_atomref``).

    Split: 110,000 train / 10,000 val / rest (10,831) test of a random permutation
    ``numpy.random.default_rng(split_seed).permutation(130831)``; ``split_seed=1`` is the
    Equiformer repository's QM9 protocol (see :func:`equiformer.datasets.qm9.qm9_split`).
    With ``subset=n`` (the first ``n`` molecules) the sizes shrink in proportion (1,000 ->
    840 / 76 / 84) unless ``train_size`` and ``val_size`` are given as counts that fit
    (leaving at least one test molecule) or as fractions in (0, 1).

    Normalisation for a task (:meth:`atomrefs`, :meth:`train_statistics`)::

        y_norm = (y - sum_atoms atomrefs()[t, z] - mean[t]) / std[t]

    Args:
        root: cache folder (default ``$EQUIFORMER_CACHE/qm9`` or ``~/.cache/equiformer/qm9``).
        targets: target names (case-insensitive; ``"homo"``, ``"U0"``, ...) or one string
            ``"homo,lumo"``.
        batch_size, eval_batch_size, num_workers, pin_memory: see :class:`StructureDataModule`.
        split_seed: seed of the random split.
        train_size, val_size: counts, or fractions in (0, 1); the test split is the rest.
        subset: use only the first ``subset`` molecules.
        subtract_atomref: serve ``y`` minus the free-atom references (atomization energies for
            U0/U/H/G), subtracted in float64 before the cast to float32; then :meth:`atomrefs`
            is all zeros, as nothing is left to add back.
        progress: progress bar while processing the raw data (first use only).
    """

    def __init__(
        self,
        root: str | None = None,
        targets: Sequence[str] | str = ("homo",),
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        split_seed: int = DEFAULT_SPLIT_SEED,
        train_size: int | float = QM9_SPLIT_SIZES["train"],  # type: ignore[assignment]
        val_size: int | float = QM9_SPLIT_SIZES["val"],  # type: ignore[assignment]
        subset: int | None = None,
        subtract_atomref: bool = False,
        pin_memory: bool = False,
        progress: bool = True,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory)
        self.root = root
        self.target_names: list[str] = resolve_qm9_targets(targets)
        self.split_seed = int(split_seed)
        self.train_size = train_size
        self.val_size = val_size
        if subset is not None and not (1 <= int(subset) <= QM9_NUM_MOLECULES):
            raise ValueError(f"subset must be in 1..{QM9_NUM_MOLECULES}, got {subset}")
        self.subset = None if subset is None else int(subset)
        self.subtract_atomref = bool(subtract_atomref)
        self.progress = bool(progress)
        self.split_sizes()  # fail early on impossible sizes
        self.save_hyperparameters()

    # -- metadata (available before setup) ---------------------------------------------------
    @property
    def target_infos(self) -> list[TargetInfo]:
        return [qm9_target_info(t) for t in self.target_names]

    @property
    def num_targets(self) -> int:
        return len(self.target_names)

    def split_sizes(self) -> dict[str, int]:
        """``{"train": n, "val": n, "test": n}`` for this configuration (no data needed)."""
        n = self.subset if self.subset is not None else QM9_NUM_MOLECULES
        sizes = {"train": self.train_size, "val": self.val_size, "test": None}
        fractional = any(isinstance(s, float) and not float(s).is_integer() for s in (self.train_size, self.val_size))
        if self.subset is not None and not fractional and int(self.train_size) + int(self.val_size) >= n:
            return scaled_split_sizes(n, QM9_NUM_MOLECULES, sizes)
        return resolve_split_sizes(n, sizes)

    def atomrefs(self) -> Tensor:
        """[T, 119] float64 per-element references (target units) to add to a model's output to
        get ``y``; zero rows for targets without one, all zeros when ``subtract_atomref``."""
        table = qm9_atomrefs(self.target_names)
        return torch.zeros_like(table) if self.subtract_atomref else table

    # -- data ---------------------------------------------------------------------------------
    def _make_dataset(self) -> QM9:
        return QM9(root=self.root, subset=self.subset, targets=self.target_names,
                   subtract_atomref=self.subtract_atomref, progress=self.progress)

    def prepare_data(self) -> None:
        """Process the raw data into the cache once (rank 0 only under DDP)."""
        self._make_dataset()

    def build(self) -> tuple[Dataset, dict[str, Tensor]]:
        dataset = self._make_dataset()
        splits = random_split_indices(len(dataset), self.split_sizes(), self.split_seed)
        return dataset, splits

    @property
    def qm9(self) -> QM9:
        ds = self.dataset
        assert isinstance(ds, QM9)
        return ds

    def train_statistics(self) -> dict[str, Tensor | int]:
        """Statistics of the targets over the training split, after the atomref subtraction.

        Returns:
            ``{"mean": [T], "std": [T] (unbiased), "mad": [T] (mean absolute deviation),
            "count": n}``, float64 tensors in target units, computed in float64 from the
            stored values (not the float32 ``y``).
        """
        ds = self.qm9
        idx = self.splits["train"]
        y = ds.y_table[idx][:, ds.target_columns] - ds.atomref_sums(self.target_names)[idx]
        mean = y.mean(0)
        std = y.std(0) if len(idx) > 1 else torch.ones_like(mean)
        return {"mean": mean, "std": std, "mad": (y - mean).abs().mean(0), "count": int(len(idx))}
