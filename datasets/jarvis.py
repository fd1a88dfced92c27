"""JARVIS-DFT 3D crystals (NIST), in the formats of jarvis-tools and ALIGNN.

Formats read (``path=``):

- the ``dft_3d`` JSON of jarvis-tools (``jdft_3d-*.json``, plain, ``.zip`` or ``.gz``): a list
  of entries with ``jid``, ``atoms`` (``lattice_mat`` rows in Å, ``coords`` fractional unless
  ``cartesian`` is true, ``elements``) and properties such as ``formation_energy_peratom``,
  ``optb88vdw_bandgap``, ``mbj_bandgap``; a missing value is the string ``"na"``.
  :func:`download_jarvis` fetches it from figshare (:data:`JARVIS_FIGSHARE`).
- a folder with POSCAR files and ``id_prop.csv`` (``file name,value`` per line, no header),
  the format of ALIGNN's ``train_folder.py`` and its ``examples/sample_data``; the value's
  name is ``id_prop_label`` (e.g. ``"optb88vdw_bandgap"``). Ids are the JARVIS ids in the file
  names (``POSCAR-JVASP-10.vasp`` -> ``JVASP-10``), else the file names.

Splits (``split=``):

- ``"leaderboard"``: jarvis-leaderboard's ``dft_3d_<property>.json.zip``
  (``{"train"|"val"|"test": {jid: value}}``; for ``formation_energy_peratom`` and
  ``optb88vdw_bandgap`` 44,569 / 5,572 / 5,572, for ``mbj_bandgap`` 14,535 / 1,817 / 1,815),
  from ``split_file=`` or the installed ``jarvis_leaderboard`` package; entries whose id is
  not in it are left out.
- ``"alignn"``: ALIGNN's seeded random split (Python's ``random.seed(123)`` shuffle of the
  entries with the target, in file order; ``int(0.8 n)`` train, the last ``int(0.1 n)`` test,
  the ``int(0.1 n)`` before them val), the split of ALIGNN, ComFormer and Crystalformer's
  JARVIS tables: 44,578 / 5,572 / 5,572 for the 55,723 formation energies of ``dft_3d_2021``.
- ``"auto"`` (default): the leaderboard split when its file is found, else none; ``None``: none.

Targets: :data:`JARVIS_LABELS` (units from the JARVIS-DFT documentation).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from equiformer.datasets.crystals import CrystalDataset, CrystalEntry, download, generic_target, read_json_any
from equiformer.datasets.targets import TargetInfo

__all__ = [
    "ALIGNN_SPLIT_SEED",
    "JARVIS_FIGSHARE",
    "JARVIS_LABELS",
    "JarvisDFT3D",
    "alignn_split_indices",
    "download_jarvis",
    "find_leaderboard_split",
    "leaderboard_split",
    "read_id_prop",
]

#: jarvis-tools' figshare files: name -> (URL, JSON member of the zip, entries)
JARVIS_FIGSHARE: dict[str, tuple[str, str, str]] = {
    "dft_3d_2021": ("https://ndownloader.figshare.com/files/29204826", "jdft_3d-8-18-2021.json", "55,723 with e_form"),
    "dft_3d_2022": ("https://ndownloader.figshare.com/files/38521619", "jdft_3d-12-12-2022.json", "75,993"),
    "dft_3d": ("https://ndownloader.figshare.com/files/64391379", "jdft_3d-9-24-2025.json", "~94k"),
}
#: seed of ALIGNN's random split
ALIGNN_SPLIT_SEED = 123
_LEADERBOARD_DIR = ("benchmarks", "AI", "SinglePropertyPrediction")


def _t(name: str, unit: str, description: str, report_unit: str | None = None, scale: float = 1.0,
       minimum: float | None = None) -> TargetInfo:
    return TargetInfo(name, unit, report_unit or unit, scale, description, minimum=minimum)


JARVIS_LABELS: dict[str, TargetInfo] = {
    t.name: t
    for t in (
        _t("formation_energy_peratom", "eV/atom", "formation energy per atom (OptB88vdW)", "meV/atom", 1000.0),
        _t("optb88vdw_bandgap", "eV", "band gap (OptB88vdW)", "meV", 1000.0, minimum=0.0),
        _t("mbj_bandgap", "eV", "band gap (TBmBJ)", "meV", 1000.0, minimum=0.0),
        _t("hse_gap", "eV", "band gap (HSE06)", "meV", 1000.0, minimum=0.0),
        _t("optb88vdw_total_energy", "eV/atom", "total energy per atom (OptB88vdW)", "meV/atom", 1000.0),
        _t("ehull", "eV/atom", "energy above the convex hull", "meV/atom", 1000.0),
        _t("bulk_modulus_kv", "GPa", "Voigt bulk modulus"),
        _t("shear_modulus_gv", "GPa", "Voigt shear modulus"),
        _t("magmom_oszicar", "mu_B", "magnetic moment (OSZICAR)"),
        _t("magmom_outcar", "mu_B", "magnetic moment (OUTCAR)"),
        _t("spillage", "1", "spin-orbit spillage"),
        _t("slme", "%", "spectroscopic limited maximum efficiency"),
        _t("epsx", "1", "dielectric constant x (OptB88vdW, no ionic part)"),
        _t("epsy", "1", "dielectric constant y (OptB88vdW, no ionic part)"),
        _t("epsz", "1", "dielectric constant z (OptB88vdW, no ionic part)"),
        _t("mepsx", "1", "dielectric constant x (TBmBJ)"),
        _t("mepsy", "1", "dielectric constant y (TBmBJ)"),
        _t("mepsz", "1", "dielectric constant z (TBmBJ)"),
        _t("exfoliation_energy", "meV/atom", "exfoliation energy"),
        _t("n-Seebeck", "muV/K", "n-type Seebeck coefficient"),
        _t("p-Seebeck", "muV/K", "p-type Seebeck coefficient"),
        _t("n-powerfact", "muW/(mK^2)", "n-type power factor"),
        _t("p-powerfact", "muW/(mK^2)", "p-type power factor"),
        _t("avg_elec_mass", "m_e", "average effective electron mass"),
        _t("avg_hole_mass", "m_e", "average effective hole mass"),
        _t("dfpt_piezo_max_dielectric", "1", "maximum dielectric constant (DFPT)"),
        _t("dfpt_piezo_max_dij", "pC/N", "maximum piezoelectric coefficient d_ij (DFPT)"),
        _t("kpoint_length_unit", "Angstrom", "converged k-point length"),
        _t("encut", "eV", "converged plane-wave cutoff"),
        _t("target", "", "the value column of an id_prop.csv"),
    )
}
_ALIASES = {
    "e_form": "formation_energy_peratom",
    "formation_energy_per_atom": "formation_energy_peratom",
    "optb88vdw_gap": "optb88vdw_bandgap",
    "gap": "optb88vdw_bandgap",
    "mbj_gap": "mbj_bandgap",
    "tbmbj_bandgap": "mbj_bandgap",
    "n_seebeck": "n-Seebeck",
    "p_seebeck": "p-Seebeck",
    "n_powerfact": "n-powerfact",
    "p_powerfact": "p-powerfact",
    "bulk_modulus": "bulk_modulus_kv",
    "shear_modulus": "shear_modulus_gv",
}
_JID = re.compile(r"(JVASP-\d+)")


# ------------------------------------------------------------------------------- splits


def alignn_split_indices(n: int, seed: int = ALIGNN_SPLIT_SEED, train_ratio: float = 0.8, val_ratio: float = 0.1,
                         test_ratio: float = 0.1) -> dict[str, list[int]]:
    """ALIGNN's random split of ``range(n)``.

    Python's ``random.seed(seed)`` then ``random.shuffle`` of ``list(range(n))``; the first
    ``int(train_ratio * n)`` are train, the last ``int(test_ratio * n)`` test and the
    ``int(val_ratio * n)`` before those val (so a few items can be in no split).
    """
    n_train, n_val, n_test = int(train_ratio * n), int(val_ratio * n), int(test_ratio * n)
    if n_train + n_val + n_test > n:
        raise ValueError(f"split sizes {n_train}+{n_val}+{n_test} exceed {n} items")
    ids = list(range(n))
    random.Random(seed).shuffle(ids)  # the generator random.seed(seed) + random.shuffle use
    return {
        "train": ids[:n_train],
        "val": ids[-(n_val + n_test) : -n_test] if n_test > 0 else ids[len(ids) - n_val :],
        "test": ids[-n_test:] if n_test > 0 else [],
    }


def _leaderboard_name(target: str) -> str:
    return f"dft_3d_{target.replace('-', '_')}.json.zip"


def find_leaderboard_split(target: str) -> Path | None:
    """Path of jarvis-leaderboard's ``dft_3d_<target>.json.zip`` in the installed
    ``jarvis_leaderboard`` package (``pip install jarvis-leaderboard``), or None."""
    spec = importlib.util.find_spec("jarvis_leaderboard")
    for loc in list(spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(loc).joinpath(*_LEADERBOARD_DIR, _leaderboard_name(target))
        if p.is_file():
            return p
    return None


def leaderboard_split(path: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
    """A jarvis-leaderboard split file: ``{"train"|"val"|"test": {id: value}}``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such split file")
    raw = read_json_any(path)
    if not isinstance(raw, dict) or "test" not in raw or not all(isinstance(v, dict) for v in raw.values()):
        raise ValueError(f"{path}: not a jarvis-leaderboard split file ({{'train','val','test'}} -> {{id: value}})")
    out = {}
    for split, values in raw.items():
        vals: dict[str, float] = {}
        for k, v in values.items():
            try:
                vals[str(k)] = float(v)
            except (TypeError, ValueError):
                vals[str(k)] = float("nan")
        out[str(split)] = vals
    return out


# ------------------------------------------------------------------------------- readers


def _jid_of(file_name: str) -> str:
    m = _JID.search(file_name)
    return m.group(1) if m else file_name


def read_id_prop(folder: str | os.PathLike[str]) -> list[tuple[str, float]]:
    """``id_prop.csv`` of a POSCAR folder: ``[(file name, value), ...]`` in file order."""
    folder = Path(folder)
    path = folder / "id_prop.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no id_prop.csv (a line 'POSCAR file name,value' per structure)")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for k, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2:
                raise ValueError(f"{path} line {k}: expected 'file name,value', got {len(row)} fields")
            name, value = row[0].strip(), row[1].strip()
            try:
                rows.append((name, float(value)))
            except ValueError:
                if k == 1:  # a header line
                    continue
                raise ValueError(f"{path} line {k}: value {value!r} is not a number") from None
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _folder_entries(folder: Path, label: str) -> list[CrystalEntry]:
    entries = []
    for k, (name, value) in enumerate(read_id_prop(folder)):
        p = folder / name
        if not p.is_file():
            raise FileNotFoundError(f"{folder / 'id_prop.csv'} line {k + 1}: structure file {name} not found")
        entries.append(CrystalEntry(_jid_of(name), "poscar", p.read_text(encoding="utf-8", errors="replace"),
                                    {label: value}, where=name))
    return entries


def _json_entries(path: Path, labels: Sequence[str]) -> list[CrystalEntry]:
    raw = read_json_any(path)
    if not isinstance(raw, list):
        raise ValueError(f"{path}: a JARVIS dft_3d file is a JSON list of entries, got {type(raw).__name__}")
    entries = []
    for k, d in enumerate(raw):
        if not isinstance(d, dict) or "atoms" not in d:
            keys = ", ".join(list(d)[:6]) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"{path} entry {k}: needs 'jid' and 'atoms' (found: {keys})")
        jid = str(d.get("jid", f"entry-{k}"))
        entries.append(CrystalEntry(jid, "jarvis", d["atoms"], {n: d.get(n) for n in labels}, where=f"entry {k}"))
    return entries


# ------------------------------------------------------------------------------- dataset


class JarvisDFT3D(CrystalDataset):
    """JARVIS-DFT 3D crystals as contract ``Data`` (see the module docstring).

    Args:
        path: a ``dft_3d`` JSON file (``.json``, ``.json.zip``, ``.json.gz``) or a folder with
            POSCARs and ``id_prop.csv``.
        root: cache folder (default ``$EQUIFORMER_CACHE/jarvis_dft_3d``).
        targets: property names (:data:`JARVIS_LABELS`, e.g. ``"formation_energy_peratom"``,
            ``"optb88vdw_bandgap"``, ``"mbj_bandgap"``); for a folder its ``id_prop_label``.
        split: ``"auto"``, ``"leaderboard"``, ``"alignn"`` or None (see the module docstring).
        split_file: a jarvis-leaderboard split file (default: found by the first target's name).
        labels: ``"source"`` (default) or ``"split"`` (the leaderboard file's values).
        id_prop_label: name of the value in ``id_prop.csv``.
        alignn_seed: seed of the ``"alignn"`` split.
        subset, dtype, force_reload, progress, processes: see :class:`CrystalDataset`.
    """

    NAME = "jarvis_dft_3d"
    LABELS = JARVIS_LABELS
    DEFAULT_TARGETS = ("formation_energy_peratom",)
    ALIASES = _ALIASES

    def __init__(
        self,
        path: str | os.PathLike[str],
        root: str | os.PathLike[str] | None = None,
        targets: str | Sequence[str] | None = None,
        split: str | None = "auto",
        split_file: str | os.PathLike[str] | None = None,
        labels: str = "source",
        id_prop_label: str = "target",
        alignn_seed: int = ALIGNN_SPLIT_SEED,
        subset: int | None = None,
        dtype: torch.dtype | None = None,
        force_reload: bool = False,
        progress: bool = True,
        processes: int = 1,
    ) -> None:
        if path is None:
            raise ValueError(f"{self.NAME}: give path= (a dft_3d JSON or a POSCAR folder with id_prop.csv); "
                             "download_jarvis() fetches the JSON")
        if split not in ("auto", "leaderboard", "alignn", None):
            raise ValueError(f"{self.NAME}: split must be 'auto', 'leaderboard', 'alignn' or None, got {split!r}")
        if labels not in ("source", "split"):
            raise ValueError(f"{self.NAME}: labels must be 'source' or 'split', got {labels!r}")
        self.path = Path(path).expanduser()
        self.is_folder = self.path.is_dir()
        self.id_prop_label = self.resolve_target(id_prop_label) if self.is_folder else id_prop_label
        self.alignn_seed = int(alignn_seed)
        self.labels_from = labels
        targets = targets if targets is not None or not self.is_folder else [self.id_prop_label]
        names = self.resolve_targets(targets)
        found = Path(split_file).expanduser() if split_file is not None else find_leaderboard_split(names[0])
        if split == "leaderboard" and (found is None or not found.exists()):
            raise FileNotFoundError(
                f"{self.NAME}: no leaderboard split file for {names[0]!r} ({_leaderboard_name(names[0])}): "
                "pass split_file= or pip install jarvis-leaderboard")
        if split == "auto":
            split = "leaderboard" if found is not None and found.exists() else None
        self.split_protocol = split
        self.split_file = found if split == "leaderboard" else None
        super().__init__(root=root, targets=names, subset=subset, dtype=dtype, force_reload=force_reload,
                         progress=progress, processes=processes)
        if len(self) == 0:
            raise ValueError(f"{self.NAME}: no structure of {self.path} has all targets {self.target_names} "
                             f"(split={self.split_protocol!r})")

    # -- hooks ----------------------------------------------------------------------------------
    def source_files(self) -> list[Path]:
        if not self.path.exists():
            raise FileNotFoundError(f"{self.NAME}: {self.path} not found (download_jarvis() fetches dft_3d)")
        if not self.is_folder:
            return [self.path]
        files = [self.path / "id_prop.csv"]
        for k, (name, _) in enumerate(read_id_prop(self.path)):
            if not (self.path / name).is_file():
                raise FileNotFoundError(f"{self.path / 'id_prop.csv'} line {k + 1}: structure file {name} not found")
            files.append(self.path / name)
        return files

    def cache_stem(self) -> str:
        return "jarvis_" + re.sub(r"[^A-Za-z0-9]+", "-", self.path.name).strip("-")

    def cache_options(self) -> dict[str, Any]:
        return {"folder": self.is_folder, "id_prop_label": self.id_prop_label if self.is_folder else None}

    def label_names(self) -> list[str]:
        if self.is_folder:
            return [self.id_prop_label]
        return [n for n in JARVIS_LABELS if n != "target"]

    def read_entries(self) -> list[CrystalEntry]:
        if self.is_folder:
            return _folder_entries(self.path, self.id_prop_label)
        return _json_entries(self.path, self.label_names())

    def resolve_targets(self, targets: str | Sequence[str] | None) -> list[str]:
        names = super().resolve_targets(targets)
        if getattr(self, "is_folder", False):
            wrong = [t for t in names if t != self.id_prop_label]
            if wrong:
                raise ValueError(f"{self.NAME}: {self.path}/id_prop.csv holds only {self.id_prop_label!r}, "
                                 f"not {wrong} (set id_prop_label=)")
        return names

    def official_split_labels(self) -> dict[str, str] | None:
        if self.split_protocol == "leaderboard":
            assert self.split_file is not None
            return {i: name for name, values in leaderboard_split(self.split_file).items() for i in values}
        if self.split_protocol == "alignn":
            cols = [self.label_columns.index(t) for t in self.target_names]
            valid = torch.isfinite(self.entry_labels[:, cols]).all(dim=1).nonzero().view(-1).tolist()
            parts = alignn_split_indices(len(valid), self.alignn_seed)
            return {self.entry_ids[valid[k]]: name for name, ks in parts.items() for k in ks}
        return None

    def label_overrides(self) -> dict[str, dict[str, float]] | None:
        if self.split_protocol != "leaderboard" or self.labels_from != "split":
            return None
        assert self.split_file is not None
        values = {i: v for part in leaderboard_split(self.split_file).values() for i, v in part.items()}
        return {self.target_names[0]: values}

    @classmethod
    def resolve_target(cls, name: str) -> str:
        try:
            return super().resolve_target(name)
        except ValueError:
            raise ValueError(f"unknown JARVIS-DFT property {name!r}; known: {', '.join(JARVIS_LABELS)}") from None


def download_jarvis(root: str | os.PathLike[str], dataset: str = "dft_3d_2021") -> Path:
    """Download a jarvis-tools figshare JSON (zipped) into ``root``; returns the zip's path,
    which :class:`JarvisDFT3D` reads directly. ``dft_3d_2021`` is the version of the ALIGNN /
    ComFormer benchmarks. Needs internet access."""
    if dataset not in JARVIS_FIGSHARE:
        raise ValueError(f"unknown JARVIS dataset {dataset!r}; choose from {', '.join(JARVIS_FIGSHARE)}")
    url, member, _ = JARVIS_FIGSHARE[dataset]
    return download(url, Path(root) / f"{member}.zip", f"JARVIS {dataset}")


def jarvis_target_info(name: str) -> TargetInfo:
    """Units of a JARVIS property (a generic entry for names without a known unit)."""
    try:
        return JARVIS_LABELS[JarvisDFT3D.resolve_target(name)]
    except ValueError:
        return generic_target(name)
