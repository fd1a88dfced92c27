"""Lightning DataModules that serve contract ``Data`` batches (PyG ``DataLoader``).

:class:`StructureDataModule` is the generic part (a map-style dataset of ``Data`` plus
named index splits -> train/val/test/predict loaders); a dataset-specific subclass builds
both in :meth:`StructureDataModule.build`. :class:`QM9DataModule` is the QM9 one.
All ``__init__`` arguments are plain typed values, so LightningCLI / YAML configs can set them.
"""

from __future__ import annotations

import dataclasses
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

__all__ = ["NORMALIZATION_MODES", "QM9_EXTENSIVE_TARGETS", "QM9DataModule", "StructureDataModule", "target_statistics"]

#: how a target is standardised: ``"per_molecule"`` (mean and std over molecules) or
#: ``"per_atom"`` (an offset per atom, std of what is left); see :func:`target_statistics`
NORMALIZATION_MODES = ("per_molecule", "per_atom")

#: QM9 targets that grow with the molecule (sums over atoms): normalised per atom by
#: ``PropertyTask(normalize="auto")``. Orbital energies, gap, dipole are intensive; alpha,
#: r2 and Cv grow with size too but are left per molecule until measured.
QM9_EXTENSIVE_TARGETS = ("zpve", "U0", "U", "H", "G")


def target_statistics(y: Tensor, num_atoms: Tensor, per_atom: Sequence[bool] | None = None) -> dict[str, Tensor | int]:
    """Normalisation statistics of targets, per molecule or per atom, column by column.

    For a per-molecule column: ``mean = mean(y)``, ``mean_per_atom = 0``, ``std = std(y)``.
    For a per-atom column: ``mean = 0``, ``mean_per_atom = mean(y / N)`` (the mean of each
    molecule's value per atom, as SchNetPack's ``divide_by_atoms`` statistics and MACE's
    energy shift), ``std = std(y - N * mean_per_atom)``: the spread of what the network
    has to learn once the extensive part is removed, so a graph-level output stays of
    order one and ``MAE(normalised) * std`` is the MAE in target units.
    Either way a target is normalised as ``(y - mean - N * mean_per_atom) / std``.

    Args:
        y: [M, T] targets of the training molecules (after any atomref subtraction).
        num_atoms: [M] atoms per molecule.
        per_atom: [T] which columns are normalised per atom (default none).
    Returns:
        ``{"mean": [T], "std": [T] (unbiased), "mean_per_atom": [T], "mad": [T] (mean absolute
        deviation of the residual), "count": M, "mode": [T] names}``; float64 tensors.
    """
    y = torch.as_tensor(y, dtype=torch.float64)
    if y.dim() == 1:
        y = y[:, None]
    M, T = y.shape
    n = torch.as_tensor(num_atoms, dtype=torch.float64).reshape(-1)
    if n.numel() != M:
        raise ValueError(f"target_statistics: {M} molecules but {n.numel()} atom counts")
    if M and float(n.min()) < 1:
        raise ValueError("target_statistics: every molecule needs at least one atom")
    mask = torch.zeros(T, dtype=torch.bool) if per_atom is None else torch.as_tensor(list(per_atom), dtype=torch.bool)
    if mask.numel() != T:
        raise ValueError(f"target_statistics: per_atom has {mask.numel()} entries for {T} targets")
    mean_per_atom = torch.where(mask, (y / n[:, None]).mean(0), torch.zeros(T, dtype=torch.float64))
    mean = torch.where(mask, torch.zeros(T, dtype=torch.float64), y.mean(0))
    resid = y - n[:, None] * mean_per_atom  # per-molecule columns: y itself
    std = resid.std(0) if M > 1 else torch.ones(T, dtype=torch.float64)
    return {"mean": mean, "std": std, "mean_per_atom": mean_per_atom, "mad": (resid - resid.mean(0)).abs().mean(0),
            "count": int(M), "mode": [NORMALIZATION_MODES[int(b)] for b in mask.tolist()]}


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

        y_norm = (y - sum_atoms atomrefs()[t, z] - mean[t] - N * mean_per_atom[t]) / std[t]

    (``mean_per_atom`` is zero for targets normalised per molecule, ``mean`` for those per atom;
    :attr:`target_infos` marks :data:`QM9_EXTENSIVE_TARGETS` as extensive).

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
        """Units and report units of the targets; ``extensive`` set for :data:`QM9_EXTENSIVE_TARGETS`."""
        infos = [qm9_target_info(t) for t in self.target_names]
        return [dataclasses.replace(i, extensive=True) if i.name in QM9_EXTENSIVE_TARGETS and not i.extensive else i
                for i in infos]

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

    def train_statistics(self, per_atom: Sequence[bool] | None = None) -> dict[str, Tensor | int]:
        """Statistics of the targets over the training split, after the atomref subtraction.

        Args:
            per_atom: [T] which targets are normalised per atom (default none: all per
                molecule, the statistics of earlier versions); see :func:`target_statistics`.
        Returns:
            ``{"mean": [T], "std": [T] (unbiased), "mean_per_atom": [T], "mad": [T] (mean
            absolute deviation), "count": n, "mode": [T]}``, float64 tensors in target units,
            computed in float64 from the stored values (not the float32 ``y``).
        """
        ds = self.qm9
        idx = self.splits["train"]
        y = ds.y_table[idx][:, ds.target_columns] - ds.atomref_sums(self.target_names)[idx]
        return target_statistics(y, ds.num_atoms[idx], per_atom)
