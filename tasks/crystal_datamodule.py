"""A Lightning DataModule for crystal property prediction (Materials Project, JARVIS, matbench, ...).

:class:`CrystalDataModule` serves contract ``Data`` batches of one crystal dataset with the
dataset's official split (MEGNet's MP-2018.6.1 split; jarvis-leaderboard's JARVIS split;
matbench's cross-validation fold; CDVAE's perov_5 files) or a seeded random split, and the
same normalisation interface as :class:`~equiformer.tasks.datamodule.QM9DataModule`
(:meth:`~CrystalDataModule.train_statistics`, :meth:`~CrystalDataModule.atomrefs`,
``target_names``, ``target_infos``), so :class:`~equiformer.tasks.property.PropertyTask`
trains crystals unchanged.

=================  =================================================  ===================  =============
``dataset``        structures (``source``)                            default targets      official split
=================  =================================================  ===================  =============
``mp_e_form``      ``flla_2015`` (offline) or ``mp.2018.6.1.json``    ``e_form``           MEGNet
``mp_gap``         ``flla_2015``, ``dielectric`` or a json            ``gap``              MEGNet
``mp_elastic``     ``elastic`` (elastic_tensor.csv)                   log_kvrh, log_gvrh   none
``mp_dielectric``  ``dielectric`` (dielectric_constant.csv)           ``n``                none
``jarvis_dft_3d``  a dft_3d JSON or a POSCAR + id_prop.csv folder     formation_energy_    leaderboard
                                                                      peratom
``matbench``       a matbench file                                    its column           fold ``fold``
``perovskites``    CDVAE perov_5 files                                ``heat_all``         CDVAE files
=================  =================================================  ===================  =============
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from equiformer.datasets.crystals import NUM_ELEMENTS, CrystalDataset
from equiformer.datasets.jarvis import JarvisDFT3D
from equiformer.datasets.materials_project import MaterialsProject
from equiformer.datasets.matbench import MATBENCH_TASKS, Matbench, read_matbench
from equiformer.datasets.perovskites import Perovskites
from equiformer.datasets.splits import DEFAULT_SPLIT_SEED, random_split_indices, resolve_split_sizes
from equiformer.datasets.targets import TargetInfo
from equiformer.tasks.datamodule import StructureDataModule, target_statistics

__all__ = ["CRYSTAL_DATASETS", "CrystalDataModule"]

logger = logging.getLogger("equiformer.tasks")

#: dataset name -> (dataset class, default structure source, default targets)
CRYSTAL_DATASETS: dict[str, tuple[type[CrystalDataset], str | None, tuple[str, ...]]] = {
    "mp_e_form": (MaterialsProject, "flla_2015", ("e_form",)),
    "mp_gap": (MaterialsProject, "flla_2015", ("gap",)),
    "mp_elastic": (MaterialsProject, "elastic", ("log_kvrh", "log_gvrh")),
    "mp_dielectric": (MaterialsProject, "dielectric", ("n",)),
    "jarvis_dft_3d": (JarvisDFT3D, None, ("formation_energy_peratom",)),
    "matbench": (Matbench, None, ()),
    "perovskites": (Perovskites, "perov_5", ("heat_all",)),
}
_SPLITS = ("official", "random", "alignn")


class CrystalDataModule(StructureDataModule):
    """Crystal property prediction data: one dataset of :data:`CRYSTAL_DATASETS` and its split.

    Batches hold ``z``, ``pos`` (Å), ``cell`` [B,3,3] (Å, rows), ``pbc`` [B,3] (all True),
    ``y`` [B,T] (the ``targets``, units in :attr:`target_infos`), ``idx`` and ``material_id``.

    Splits:

    - ``"official"``: the dataset's own (see the module table). Where it has no validation
      part (matbench folds) ``val_size`` of the training part is set aside at random
      (``split_seed``). A dataset without an official split (``mp_elastic``, JARVIS without a
      leaderboard file) falls back to ``"random"`` with a log message; one whose official split
      lacks a training part offline (perovskites: only CDVAE's val and test files ship) raises.
    - ``"random"``: ``train_size`` / ``val_size`` (counts, or fractions in (0, 1)) / rest of a
      ``numpy.random.default_rng(split_seed)`` permutation.
    - ``"alignn"``: JARVIS only, ALIGNN's seeded 80/10/10 split.

    Normalisation (as :class:`~equiformer.tasks.datamodule.QM9DataModule`)::

        y_norm = (y - sum_atoms atomrefs()[t, z] - mean[t]) / std[t]     # atomrefs are zero here

    Args:
        dataset: a key of :data:`CRYSTAL_DATASETS`.
        root: cache folder (default ``$EQUIFORMER_CACHE/<dataset class name>``).
        targets: target names (one string may list several: ``"e_form,gap"``); default per dataset.
            For a JARVIS POSCAR folder the first target names its ``id_prop.csv`` value.
        batch_size, eval_batch_size, num_workers, pin_memory: see :class:`StructureDataModule`.
        source: the structures: MP ``"flla_2015"`` / ``"dielectric"`` / ``"elastic"`` or a
            path to ``mp.2018.6.1.json``; the JARVIS file or folder; the matbench file; the
            perov_5 folder (``"perov_5"``: the shared data). Default per dataset (MP:
            ``flla_2015``, offline).
        data_dir: the shared data folder (default ``$EQUIFORMER_SHARED_DATA`` or ``../shared/data``).
        split: ``"official"``, ``"random"`` or ``"alignn"``.
        split_file: MP: folder (or one file) of the MEGNet split files; JARVIS: the leaderboard file.
        labels: MP / JARVIS: ``"split"`` (values of the split files) or ``"source"``; default
            ``"split"`` for MP, ``"source"`` for JARVIS.
        split_seed: seed of random splits (and of the validation part carved from matbench folds).
        train_size, val_size: sizes of a random split (counts or fractions); ``val_size`` also
            sizes the validation part carved from a training fold.
        fold: matbench fold (0-4).
        subset: use only the first ``subset`` structures of the source.
        progress: progress bar while processing (first use only).
        processes: worker processes for the first processing.
    """

    def __init__(
        self,
        dataset: str = "mp_e_form",
        root: str | None = None,
        targets: Sequence[str] | str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        source: str | None = None,
        data_dir: str | None = None,
        split: str = "official",
        split_file: str | None = None,
        labels: str | None = None,
        split_seed: int = DEFAULT_SPLIT_SEED,
        train_size: int | float = 0.8,
        val_size: int | float = 0.1,
        fold: int = 0,
        subset: int | None = None,
        pin_memory: bool = False,
        progress: bool = True,
        processes: int = 1,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory)
        if dataset not in CRYSTAL_DATASETS:
            raise ValueError(f"unknown crystal dataset {dataset!r}; choose from {', '.join(CRYSTAL_DATASETS)}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
        if split == "alignn" and dataset != "jarvis_dft_3d":
            raise ValueError("split='alignn' is ALIGNN's JARVIS protocol; use it with dataset='jarvis_dft_3d'")
        if subset is not None and int(subset) < 1:
            raise ValueError(f"subset must be >= 1, got {subset}")
        cls, default_source, default_targets = CRYSTAL_DATASETS[dataset]
        self.dataset_name = dataset
        self.root = root
        self.source = source if source is not None else default_source
        if self.source is None:
            raise ValueError(f"dataset {dataset!r} needs source= (a file or folder; see CrystalDataModule's docs)")
        self.data_dir = data_dir
        self.split = split
        #: the split protocol in use after setup ("random" when an official split was not available)
        self.split_used = split
        self.split_file = split_file
        self.labels = labels
        self.split_seed = int(split_seed)
        self.train_size = train_size
        self.val_size = val_size
        self.fold = int(fold)
        self.subset = None if subset is None else int(subset)
        self.progress = bool(progress)
        self.processes = int(processes)
        self._target_infos = self._resolve_targets(cls, targets, default_targets)
        self.target_names: list[str] = [t.name for t in self._target_infos]
        # fail early on impossible sizes (counts are checked against the data in setup)
        resolve_split_sizes(10**9, {"val": val_size, "train": None})
        if split == "random":
            resolve_split_sizes(10**9, {"train": train_size, "val": val_size, "test": None})
            if all(isinstance(x, float) and not float(x).is_integer() for x in (train_size, val_size)) \
                    and train_size + val_size >= 1:
                raise ValueError(f"train_size + val_size = {train_size + val_size} leaves no test part")
        self.save_hyperparameters()

    # -- metadata (available before setup) ---------------------------------------------------
    def _resolve_targets(self, cls: type[CrystalDataset], targets: Sequence[str] | str | None,
                         default: tuple[str, ...]) -> list[TargetInfo]:
        if isinstance(targets, str):
            targets = [t for t in targets.replace(" ", ",").split(",") if t]
        if cls is Matbench:
            path = Path(self.source)  # type: ignore[arg-type]
            task = next((n for n in MATBENCH_TASKS if path.name.startswith(n + ".")), None)
            column, unit = (MATBENCH_TASKS[task][0], MATBENCH_TASKS[task][1]) if task else (read_matbench(path)[1], "")
            if targets and list(targets) not in ([column], ["target"]):
                raise ValueError(f"{path.name} has the one target {column!r}, not {list(targets)}")
            return [TargetInfo(column, unit, unit, 1.0, f"{task or path.name}: {column}")]
        names = list(targets) if targets else list(default)
        if not names:
            raise ValueError(f"no targets for dataset {self.dataset_name!r}")
        canonical = [cls.resolve_target(t) for t in names]
        if len(set(canonical)) != len(canonical):
            raise ValueError(f"targets listed twice: {canonical}")
        return [cls.LABELS[t] for t in canonical]

    @property
    def target_infos(self) -> list[TargetInfo]:
        return list(self._target_infos)

    @property
    def num_targets(self) -> int:
        return len(self.target_names)

    def atomrefs(self) -> Tensor:
        """[T, 119] float64 zeros (same meaning as QM9DataModule's: per-element references to
        add to a model's output; crystal targets here are per-atom or intensive, so none)."""
        return torch.zeros(self.num_targets, NUM_ELEMENTS, dtype=torch.float64)

    # -- data ---------------------------------------------------------------------------------
    def _make_dataset(self) -> CrystalDataset:
        common: dict[str, Any] = dict(root=self.root, targets=self.target_names, subset=self.subset,
                                      progress=self.progress, processes=self.processes)
        name = self.dataset_name
        if name in ("mp_e_form", "mp_gap", "mp_elastic", "mp_dielectric"):
            labels = self.labels or ("split" if name in ("mp_e_form", "mp_gap") else "source")
            megnet = name in ("mp_e_form", "mp_gap") and (self.split == "official" or labels == "split")
            split_dir = None
            if self.split_file is not None:
                p = Path(self.split_file)
                split_dir = p if p.is_dir() else p.parent
            return MaterialsProject(structures=self.source, split="megnet" if megnet else None, labels=labels,
                                    data_dir=self.data_dir, split_dir=split_dir, **common)
        if name == "jarvis_dft_3d":
            split = {"official": "auto", "random": None, "alignn": "alignn"}[self.split]
            folder = Path(self.source).is_dir()  # type: ignore[arg-type]
            return JarvisDFT3D(path=self.source, split=split, split_file=self.split_file,  # type: ignore[arg-type]
                               labels=self.labels or "source",
                               id_prop_label=self.target_names[0] if folder else "target", **common)
        if name == "matbench":
            return Matbench(path=self.source, fold=self.fold if self.split == "official" else None,  # type: ignore[arg-type]
                            **common)
        if name == "perovskites":
            folder = None if self.source == "perov_5" else Path(self.source)  # type: ignore[arg-type]
            if folder is not None and not folder.is_dir():
                raise ValueError(f"perovskites: source must be 'perov_5' (the shared data) or a folder, got {folder}")
            has_train = folder is not None and any(folder.glob("*train*.csv*"))
            splits = ("train", "val", "test") if has_train else ("val", "test")
            return Perovskites(data_dir=self.data_dir, folder=folder, splits=splits, **common)
        raise AssertionError(name)  # pragma: no cover

    def prepare_data(self) -> None:
        """Process the raw data into the cache once (rank 0 only under DDP)."""
        self._make_dataset()

    def build(self) -> tuple[Dataset, dict[str, Tensor]]:
        dataset = self._make_dataset()
        self.split_used = self.split
        official = dataset.official_split() if self.split in ("official", "alignn") else None
        if self.split in ("official", "alignn") and official is None:
            logger.warning("%s: no official split available; using a random split (seed %d)",
                           self.dataset_name, self.split_seed)
            self.split_used = "random"
        if official is None:
            sizes = {"train": self.train_size, "val": self.val_size, "test": None}
            return dataset, random_split_indices(len(dataset), sizes, self.split_seed)
        if "train" not in official or "test" not in official:
            raise ValueError(f"{self.dataset_name}: the official split available here has only {sorted(official)} "
                             "(no train/test part); use split='random'")
        splits = {k: official[k] for k in ("train", "val", "test") if k in official}
        if "val" not in splits:  # e.g. matbench folds: carve val from train
            train = splits["train"]
            parts = random_split_indices(len(train), {"val": self.val_size, "train": None}, self.split_seed)
            splits["val"] = train[parts["val"]].sort().values
            splits["train"] = train[parts["train"]].sort().values
        return dataset, {k: splits[k] for k in ("train", "val", "test")}

    @property
    def crystals(self) -> CrystalDataset:
        ds = self.dataset
        assert isinstance(ds, CrystalDataset)
        return ds

    def split_sizes(self) -> dict[str, int]:
        """``{"train": n, "val": n, "test": n}`` (builds the dataset on first use)."""
        return {k: int(len(v)) for k, v in self.splits.items()}

    def train_statistics(self, per_atom: Sequence[bool] | None = None) -> dict[str, Tensor | int]:
        """Statistics of the targets over the training split (atomrefs are zero).

        Args:
            per_atom: [T] which targets are normalised per atom (default none: per structure);
                see :func:`equiformer.tasks.datamodule.target_statistics`.
        Returns:
            ``{"mean": [T], "std": [T] (unbiased), "mean_per_atom": [T], "mad": [T] (mean absolute
            deviation), "count": n, "mode": [T]}``, float64 in target units, from the stored
            float64 values.
        """
        idx = self.splits["train"]
        return target_statistics(self.crystals.y_table[idx], self.crystals.num_atoms[idx], per_atom)
