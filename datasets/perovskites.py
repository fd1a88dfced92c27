"""Cubic perovskites of CDVAE's ``perov_5`` (Castelli et al., Energy Environ. Sci. 5, 9034 (2012)).

Files ``perov_5_{train,val,test}.csv[.gz]`` (CDVAE's ``data/perov_5/{train,val,test}.csv``,
:data:`PEROV5_URL`): columns ``material_id``, ``cif`` (5-atom cubic cells), ``formula`` and
the labels below. Offline, ``<data_dir>/perovskites/`` holds the val (3,787) and test (3,785)
files. The split is CDVAE's: each structure belongs to the split of its file.

===========  =======  ========================================================================
label        unit     meaning
===========  =======  ========================================================================
heat_all     eV/cell  heat of formation from all standard states (Castelli's
                      ``heat_of_formation_all``; matbench_perovskites documents the same
                      quantity as per 5-atom cell)
heat_ref     eV/cell  heat of formation w.r.t. reference phases (CDVAE's property)
dir_gap      eV       direct band gap (GLLB-SC)
ind_gap      eV       indirect band gap (GLLB-SC)
===========  =======  ========================================================================
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from equiformer.datasets.crystals import CrystalDataset, CrystalEntry, default_data_dir, download
from equiformer.datasets.targets import TargetInfo

__all__ = ["PEROV5_LABELS", "PEROV5_URL", "Perovskites", "download_perov5"]

#: CDVAE's perov_5 files (``{split}`` = train, val, test)
PEROV5_URL = "https://raw.githubusercontent.com/txie-93/cdvae/main/data/perov_5/{split}.csv"

PEROV5_LABELS: dict[str, TargetInfo] = {
    "heat_all": TargetInfo("heat_all", "eV/cell", "meV/cell", 1000.0, "heat of formation (all standard states)"),
    "heat_ref": TargetInfo("heat_ref", "eV/cell", "meV/cell", 1000.0, "heat of formation (reference phases)"),
    "dir_gap": TargetInfo("dir_gap", "eV", "meV", 1000.0, "direct band gap (GLLB-SC)", minimum=0.0),
    "ind_gap": TargetInfo("ind_gap", "eV", "meV", 1000.0, "indirect band gap (GLLB-SC)", minimum=0.0),
}


def _find(folder: Path, split: str) -> Path:
    for name in (f"perov_5_{split}.csv.gz", f"perov_5_{split}.csv", f"{split}.csv"):
        if (folder / name).exists():
            return folder / name
    return folder / f"perov_5_{split}.csv.gz"


class Perovskites(CrystalDataset):
    """CDVAE's perov_5 cubic perovskites as contract ``Data``.

    Args:
        root: cache folder (default ``$EQUIFORMER_CACHE/perovskites``).
        splits: which of CDVAE's files to read (``"train"``, ``"val"``, ``"test"``); default the
            two available offline.
        targets: labels in ``y`` (default ``heat_all``).
        data_dir: the shared data folder; files in ``<data_dir>/perovskites/``.
        folder: the folder of the files instead (e.g. from :func:`download_perov5`).
        subset, dtype, force_reload, progress, processes: see :class:`CrystalDataset`.
    """

    NAME = "perovskites"
    LABELS = PEROV5_LABELS
    DEFAULT_TARGETS = ("heat_all",)

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        splits: Sequence[str] = ("val", "test"),
        targets: str | Sequence[str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        folder: str | os.PathLike[str] | None = None,
        subset: int | None = None,
        dtype: torch.dtype | None = None,
        force_reload: bool = False,
        progress: bool = True,
        processes: int = 1,
    ) -> None:
        bad = [s for s in splits if s not in ("train", "val", "test")]
        if bad or not splits:
            raise ValueError(f"perovskites splits must be among train, val, test; got {list(splits)}")
        base = Path(folder) if folder is not None else (
            Path(data_dir) if data_dir is not None else default_data_dir()) / "perovskites"
        self.files = {s: _find(base, s) for s in splits}
        super().__init__(root=root, targets=targets, subset=subset, dtype=dtype, force_reload=force_reload,
                         progress=progress, processes=processes)

    def source_files(self) -> list[Path]:
        return list(self.files.values())

    def cache_stem(self) -> str:
        return "perov5_" + "-".join(self.files)

    def read_entries(self) -> list[CrystalEntry]:
        import pandas as pd

        entries = []
        for split, path in self.files.items():
            df = pd.read_csv(path)
            missing = [c for c in ("material_id", "cif", *PEROV5_LABELS) if c not in df.columns]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; has {list(df.columns)}")
            for k, row in enumerate(df.itertuples(index=False)):
                labels = {n: getattr(row, n) for n in PEROV5_LABELS}
                entries.append(CrystalEntry(f"perov5-{row.material_id}", "cif", row.cif, labels, split=split,
                                            where=f"{path.name} row {k}"))
        return entries


def download_perov5(root: str | os.PathLike[str]) -> Path:
    """Download CDVAE's perov_5 train/val/test CSVs into ``root`` (``Perovskites(folder=root,
    splits=("train", "val", "test"))`` reads them). Needs internet access."""
    root = Path(root)
    for split in ("train", "val", "test"):
        download(PEROV5_URL.format(split=split), root / f"perov_5_{split}.csv", f"perov_5 {split}")
    return root
