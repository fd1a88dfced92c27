"""Matbench v0.1 structure tasks (Dunn et al., npj Comput. Mater. 6, 138 (2020)).

A matbench file (``matbench_mp_e_form.json.gz`` etc., :data:`MATBENCH_URL`) is a pandas
``to_json(orient="split")`` table: ``{"index": [ids], "columns": ["structure", <target>],
"data": [[pymatgen Structure dict, value], ...]}``. :class:`Matbench` serves it as contract
``Data``; :func:`matbench_fold_indices` gives the official 5-fold cross-validation (scikit-learn's
``KFold(n_splits=5, shuffle=True, random_state=18012019)`` on the file's row order, reproduced
with numpy: ``RandomState(18012019).permutation(n)`` cut into folds of ``n // 5`` (+1 for the
first ``n % 5``)). Fold ``k``'s test set is the ``k``-th piece; the rest is its training set.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from equiformer.datasets.crystals import CrystalDataset, CrystalEntry, download, read_json_any
from equiformer.datasets.targets import TargetInfo

__all__ = [
    "MATBENCH_SEED",
    "MATBENCH_TASKS",
    "MATBENCH_URL",
    "Matbench",
    "download_matbench",
    "matbench_fold_indices",
    "read_matbench",
]

#: download location of the matbench v0.1 files (``{name}`` e.g. ``matbench_mp_e_form``)
MATBENCH_URL = "https://ml.materialsproject.org/projects/{name}.json.gz"
#: random_state of matbench's KFold
MATBENCH_SEED = 18012019
MATBENCH_FOLDS = 5

#: the structure regression tasks of matbench v0.1: name -> (target column, unit, rows)
MATBENCH_TASKS: dict[str, tuple[str, str, int]] = {
    "matbench_mp_e_form": ("e_form", "eV/atom", 132_752),
    "matbench_mp_gap": ("gap pbe", "eV", 106_113),
    "matbench_log_kvrh": ("log10(K_VRH)", "log10(GPa)", 10_987),
    "matbench_log_gvrh": ("log10(G_VRH)", "log10(GPa)", 10_987),
    "matbench_perovskites": ("e_form", "eV/cell", 18_928),
    "matbench_dielectric": ("n", "1", 4_764),
    "matbench_jdft2d": ("exfoliation_en", "meV/atom", 636),
    "matbench_phonons": ("last phdos peak", "cm^-1", 1_265),
}


def matbench_fold_indices(n: int, fold: int, seed: int = MATBENCH_SEED,
                          folds: int = MATBENCH_FOLDS) -> dict[str, Tensor]:
    """``{"train": rows, "test": rows}`` (sorted LongTensors) of matbench fold ``fold`` of ``n`` rows."""
    if not 0 <= int(fold) < folds:
        raise ValueError(f"matbench fold must be in 0..{folds - 1}, got {fold}")
    perm = np.random.RandomState(seed).permutation(n)
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    start = int(sizes[:fold].sum())
    test = np.sort(perm[start : start + sizes[fold]])
    mask = np.ones(n, dtype=bool)
    mask[test] = False
    train = np.flatnonzero(mask).astype(np.int64)
    return {"train": torch.from_numpy(train), "test": torch.from_numpy(test.astype(np.int64))}


def read_matbench(path: str | os.PathLike[str]) -> tuple[list[str], str, list[Any], list[Any]]:
    """``(ids, target column, structure dicts, values)`` of a matbench file."""
    path = Path(path)
    raw = read_json_any(path)
    if not isinstance(raw, dict) or not {"index", "columns", "data"} <= set(raw):
        raise ValueError(f"{path}: not a matbench file (a JSON object with 'index', 'columns', 'data')")
    columns = list(raw["columns"])
    if "structure" not in columns:
        raise ValueError(f"{path}: no 'structure' column (columns: {columns}); composition tasks are not crystals")
    others = [c for c in columns if c != "structure"]
    if len(others) != 1:
        raise ValueError(f"{path}: expected one target column next to 'structure', got {others}")
    si, ti = columns.index("structure"), columns.index(others[0])
    if len(raw["index"]) != len(raw["data"]):
        raise ValueError(f"{path}: {len(raw['index'])} ids but {len(raw['data'])} rows")
    rows = raw["data"]
    return [str(i) for i in raw["index"]], others[0], [r[si] for r in rows], [r[ti] for r in rows]


def _task_of(path: Path) -> str | None:
    for name in MATBENCH_TASKS:
        if path.name.startswith(name + "."):
            return name
    return None


class Matbench(CrystalDataset):
    """A matbench structure task as contract ``Data``; ``y`` is its one target column.

    Args:
        path: the matbench file (``.json`` or ``.json.gz``), e.g. from :func:`download_matbench`.
        root: cache folder (default ``$EQUIFORMER_CACHE/matbench``).
        fold: the cross-validation fold (0-4) whose test set :meth:`official_split` returns as
            ``"test"`` (the rest as ``"train"``); None for no official split.
        targets: the target column (default: the file's); ``"target"`` also names it.
        subset, dtype, force_reload, progress, processes: see :class:`CrystalDataset`.

    The unit comes from :data:`MATBENCH_TASKS` when the file name is a task name.
    """

    NAME = "matbench"

    def __init__(
        self,
        path: str | os.PathLike[str],
        root: str | os.PathLike[str] | None = None,
        fold: int | None = 0,
        targets: str | Sequence[str] | None = None,
        subset: int | None = None,
        dtype: torch.dtype | None = None,
        force_reload: bool = False,
        progress: bool = True,
        processes: int = 1,
    ) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise FileNotFoundError(f"{self.NAME}: {self.path} not found (download_matbench(name, root) fetches it)")
        self.task = _task_of(self.path)
        # a known task names its column without reading the (large) file; a cache hit never reads it
        column = MATBENCH_TASKS[self.task][0] if self.task else read_matbench(self.path)[1]
        self.column = column
        unit = MATBENCH_TASKS[self.task][1] if self.task else ""
        info = TargetInfo(column, unit, unit, 1.0, f"{self.task or self.path.name}: {column}")
        self.LABELS = {column: info}  # instance-level: the file names its target
        self.ALIASES = {"target": column}
        self.fold = None if fold is None else int(fold)
        if self.fold is not None and not 0 <= self.fold < MATBENCH_FOLDS:
            raise ValueError(f"matbench fold must be in 0..{MATBENCH_FOLDS - 1}, got {fold}")
        super().__init__(root=root, targets=targets if targets is not None else [column], subset=subset, dtype=dtype,
                         force_reload=force_reload, progress=progress, processes=processes)

    def resolve_target(self, name: str) -> str:  # type: ignore[override]
        key = str(name).strip()
        if key in self.LABELS:
            return key
        if key.lower() in self.ALIASES:
            return self.ALIASES[key.lower()]
        raise ValueError(f"{self.path.name} has the target {self.column!r}, not {name!r}")

    def source_files(self) -> list[Path]:
        return [self.path]

    def cache_stem(self) -> str:
        return "matbench_" + re.sub(r"[^A-Za-z0-9]+", "-", self.path.name.split(".")[0]).strip("-")

    def label_names(self) -> list[str]:
        return [self.column]

    def read_entries(self) -> list[CrystalEntry]:
        ids, column, structures, values = read_matbench(self.path)
        if column != self.column:
            raise ValueError(f"{self.path}: target column is {column!r}, but {self.task} has {self.column!r}")
        return [CrystalEntry(i, "pmg_dict", s, {column: v}, where=f"row {k}")
                for k, (i, s, v) in enumerate(zip(ids, structures, values))]

    def official_split_labels(self) -> dict[str, str] | None:
        if self.fold is None:
            return None
        ids = self.entry_ids  # every row of the file (the folds are defined on all of them)
        parts = matbench_fold_indices(len(ids), self.fold)
        return {ids[int(k)]: name for name, rows in parts.items() for k in rows}


def download_matbench(name: str, root: str | os.PathLike[str]) -> Path:
    """Download a matbench v0.1 file (e.g. ``"matbench_mp_e_form"``) into ``root``; returns
    its path, which :class:`Matbench` reads. Needs internet access."""
    if name not in MATBENCH_TASKS:
        raise ValueError(f"unknown matbench structure task {name!r}; choose from {', '.join(MATBENCH_TASKS)}")
    return download(MATBENCH_URL.format(name=name), Path(root) / f"{name}.json.gz", name)
