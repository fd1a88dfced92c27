"""DataModules for OC20: relaxation trajectories (split by trajectory) and the public LMDB splits.

Both serve contract ``Data`` batches (``z``, ``pos``, ``cell``, ``pbc``, ``energy``, ``forces``,
``tags``, ``fixed``, ...) for :class:`equiformer.tasks.energy_force.EnergyForceTask`, which
computes its normalisation statistics from :meth:`split_dataset("train")`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset

from equiformer.datasets.oc20 import OC20LMDB, OC20Trajectories
from equiformer.datasets.splits import DEFAULT_SPLIT_SEED, SizeSpec
from equiformer.tasks.datamodule import StructureDataModule

__all__ = ["OC20LMDBDataModule", "OC20TrajectoryDataModule", "max_free_force"]


def max_free_force(dataset: OC20Trajectories, items: Tensor) -> Tensor:
    """``[len(items)]`` float64: the largest force norm (eV/Å) on a free (not fixed) atom of each item; 0 if none."""
    arr = dataset.energy_force_arrays(items)
    norm = arr["forces"].norm(dim=-1).masked_fill(arr["fixed"], 0.0)
    out = torch.zeros(len(items), dtype=torch.float64)
    return out.scatter_reduce(0, arr["atom_item"], norm, reduce="amax", include_self=True)


class OC20TrajectoryDataModule(StructureDataModule):
    """S2EF-style training on OC20 relaxation trajectories, split **by trajectory**.

    The trajectories (default: the 30 real OC20 relaxations of the shared
    ``oc20_relaxation_trajectories.tar.gz``) are shuffled with ``split_seed`` and cut into
    train / val / test trajectory sets; every frame of a relaxation lands in the split of its
    trajectory, so no split sees frames of another split's relaxations.

    Args:
        root: cache folder (archive extraction + processed frames), see :class:`OC20Trajectories`.
        source: archive, folder or file list of trajectories (default: the shared archive).
        trajectories: first ``k`` trajectories by name, or a list of names (default all).
        frame_stride: keep every ``frame_stride``-th frame of each trajectory.
        max_frames_per_trajectory: at most this many frames (after the stride) per trajectory.
        train_size, val_size: trajectories in train / val (counts, or fractions in (0, 1));
            the test split takes the rest.
        split_seed: seed of the trajectory permutation.
        cover_elements: hold out only trajectories whose elements all occur in training
            (see :meth:`OC20Trajectories.split`); the train split takes the rest.
        max_train_force: drop *training* frames in which a free atom's force exceeds this many
            eV/Å (the first frames of some relaxations reach 20-355 eV/Å, while no validation or
            test frame of the shared set exceeds 18.5); validation and test keep every frame.
            ``None``: keep all.
        batch_size, eval_batch_size, num_workers, pin_memory, drop_last: see :class:`StructureDataModule`.
    """

    def __init__(
        self,
        root: str | None = None,
        source: str | None = None,
        trajectories: int | list[str] | None = None,
        frame_stride: int = 1,
        max_frames_per_trajectory: int | None = None,
        train_size: int | float = 0.8,
        val_size: int | float = 0.1,
        split_seed: int = DEFAULT_SPLIT_SEED,
        cover_elements: bool = False,
        max_train_force: float | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, drop_last=drop_last)
        self.cover_elements = bool(cover_elements)
        self.root = root
        self.source = source
        self.trajectories = trajectories
        self.frame_stride = int(frame_stride)
        self.max_frames_per_trajectory = max_frames_per_trajectory
        self.train_size = train_size
        self.val_size = val_size
        self.split_seed = int(split_seed)
        if max_train_force is not None and not max_train_force > 0:
            raise ValueError(f"max_train_force must be a positive force in eV/A or None, got {max_train_force!r}")
        self.max_train_force = None if max_train_force is None else float(max_train_force)
        self.save_hyperparameters()

    def split_sizes(self) -> dict[str, SizeSpec]:
        return {"train": self.train_size, "val": self.val_size, "test": None}

    def _make_dataset(self) -> OC20Trajectories:
        return OC20Trajectories(root=self.root, source=self.source, trajectories=self.trajectories,
                                frame_stride=self.frame_stride, max_frames_per_trajectory=self.max_frames_per_trajectory)

    def prepare_data(self) -> None:
        """Extract and process the trajectories into the cache once (rank 0 only under DDP)."""
        self._make_dataset()

    def build(self) -> tuple[Dataset, dict[str, Tensor]]:
        dataset = self._make_dataset()
        splits = dataset.split(self.split_sizes(), self.split_seed, self.cover_elements)
        if self.max_train_force is not None:
            train = torch.as_tensor(splits["train"], dtype=torch.long)
            keep = max_free_force(dataset, train) <= self.max_train_force
            if not bool(keep.any()):
                raise ValueError(f"max_train_force={self.max_train_force} eV/A removes every training frame")
            splits = {**splits, "train": train[keep]}
        return dataset, splits

    def trajectory_split(self) -> dict[str, list[str]]:
        """``{split: [trajectory names]}`` of this configuration."""
        ds = self.dataset
        assert isinstance(ds, OC20Trajectories)
        return {k: [ds.names[i] for i in v.tolist()] for k, v in ds.trajectory_split(self.split_sizes(), self.split_seed, self.cover_elements).items()}


class OC20LMDBDataModule(StructureDataModule):
    """OC20 from fairchem/OCP LMDBs: separate train / val (/ test) files or shard folders.

    E.g. S2EF-2M: ``train=<root>/s2ef/2M/train``, ``val=<root>/s2ef/all/val_id`` (layout of
    :mod:`equiformer.datasets.download`). The splits are the given datasets, concatenated;
    ``train_subset`` / ``val_subset`` keep only the first entries (quick runs).

    Args:
        train, val, test: LMDB file or folder of shards (``test`` optional: without it the test
            loader serves the validation set).
        train_subset, val_subset, test_subset: use only the first n entries.
        check_overlap: reject overlapping atoms (a neighbour search per item).
        batch_size, eval_batch_size, num_workers, pin_memory, drop_last: see :class:`StructureDataModule`.
    """

    def __init__(
        self,
        train: str,
        val: str,
        test: str | None = None,
        train_subset: int | None = None,
        val_subset: int | None = None,
        test_subset: int | None = None,
        check_overlap: bool = False,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, drop_last=drop_last)
        self.paths = {"train": train, "val": val, "test": test}
        self.subsets = {"train": train_subset, "val": val_subset, "test": test_subset}
        self.check_overlap = bool(check_overlap)
        self.save_hyperparameters()

    def build(self) -> tuple[Dataset, dict[str, Tensor]]:
        parts: list[Dataset] = []
        splits: dict[str, Tensor] = {}
        start = 0
        for name in ("train", "val", "test"):
            path = self.paths[name]
            if path is None:
                continue
            ds = OC20LMDB(path, check_overlap=self.check_overlap)
            n = len(ds)
            cap = self.subsets[name]
            if cap is not None:
                n = min(n, int(cap))
            parts.append(ds)
            splits[name] = torch.arange(start, start + n)
            start += len(ds)
        if "test" not in splits:
            splits["test"] = splits["val"]
        return ConcatDataset(parts), splits

    def datasets(self) -> dict[str, OC20LMDB]:
        """The LMDB dataset of each given split."""
        ds = self.dataset
        assert isinstance(ds, ConcatDataset)
        names = [n for n in ("train", "val", "test") if self.paths[n] is not None]
        return dict(zip(names, ds.datasets))  # type: ignore[arg-type]
