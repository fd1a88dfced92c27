"""Materials Project crystals: MEGNet's MP-2018.6.1 benchmark and smaller MP tables.

The benchmark of MEGNet, ALIGNN, ComFormer and Crystalformer is MEGNet's ``mp.2018.6.1.json``
(69,239 structures; :data:`MEGNET_MP2018_URL`, :func:`download_megnet_mp2018`) with the split
of jarvis-leaderboard's ``megnet_{e_form,gappbe}.json.zip``: 60,000 train / 5,000 val / 4,239
test ids with the formation energy per atom (eV/atom) and the PBE band gap (eV).

Structure sources (``structures=``):

==============  ==============================================================  ==============
source          file                                                            labels
==============  ==============================================================  ==============
``flla_2015``   ``materials_project/flla_2015.csv``: 3,938 MP structures as     e_form
                pymatgen dicts (Faber et al. 2015, from matminer 0.4.1)
``dielectric``  ``materials_project/dielectric_constant.csv``: 1,056 CIFs       gap, n
                (Petousis et al. 2017); its header is one column short
``elastic``     ``materials_project/elastic_tensor.csv``: 1,181 CIFs            log_kvrh,
                (de Jong et al. 2015)                                           log_gvrh
a path          ``mp.2018.6.1.json`` (``.zip``/``.gz``; a list of               e_form, gap,
                ``{"material_id", "structure": CIF text or pymatgen dict,       log_kvrh,
                "formation_energy_per_atom", "band_gap", ...}``), or a file     log_gvrh
                written by :func:`fetch_materials_project`
==============  ==============================================================  ==============

With ``split="megnet"`` every structure goes to the split its id has in the official split
file, and ids absent from it are left out; ``labels="split"`` takes ``e_form`` / ``gap`` from
the split files (MP-2018.6.1's values), ``labels="source"`` from the structure source.
Offline, ``flla_2015`` gives a real, officially split subset: 3,909 of its ids are in the
MEGNet set (3,418 train / 265 val / 226 test). Its 2015 formation energies differ from the
2018 ones: median 1.0 meV/atom, 95th percentile 8.3 meV/atom, largest 0.41 eV/atom (mp-632723),
only 178 agree to 1e-6; the structures are MP's 2015 relaxations.

Targets (``y`` columns):

===========  ===========  ==============================================================
name         unit         meaning
===========  ===========  ==============================================================
e_form       eV/atom      formation energy per atom (reported in meV/atom)
gap          eV           PBE band gap (reported in meV)
log_kvrh     log10(GPa)   log10 of the Voigt-Reuss-Hill bulk modulus (MEGNet, matbench)
log_gvrh     log10(GPa)   log10 of the Voigt-Reuss-Hill shear modulus
n            1            refractive index (dielectric table)
===========  ===========  ==============================================================

The Materials Project API (:func:`fetch_materials_project`) fetches current structures and
labels with a user's key (``MP_API_KEY``) into a JSON file this module reads.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from equiformer.datasets.crystals import (
    SHARED_DATA_ENV,
    CrystalDataset,
    CrystalEntry,
    default_data_dir,
    download,
    read_json_any,
)
from equiformer.datasets.targets import TargetInfo

__all__ = [
    "MEGNET_MP2018_URL",
    "MEGNET_SPLIT_SIZES",
    "MP_LABELS",
    "MPBandGap",
    "MPElastic",
    "MPFormationEnergy",
    "MaterialsProject",
    "download_megnet_mp2018",
    "fetch_materials_project",
    "megnet_split",
    "megnet_split_ids",
    "read_mp_csv",
]

#: MEGNet's MP-2018.6.1 structures (figshare; a zip holding ``mp.2018.6.1.json``, 69,239 entries)
MEGNET_MP2018_URL = "https://figshare.com/ndownloader/files/15087992"
MEGNET_MP2018_FILE = "mp.2018.6.1.json.zip"
#: sizes of the official split (jarvis-leaderboard's megnet_e_form / megnet_gappbe)
MEGNET_SPLIT_SIZES: dict[str, int] = {"train": 60_000, "val": 5_000, "test": 4_239}
#: split files per target, in ``<data_dir>/materials_project/megnet_splits/``
MEGNET_SPLIT_FILES: dict[str, str] = {"e_form": "megnet_e_form.json.zip", "gap": "megnet_gappbe.json.zip"}

MP_LABELS: dict[str, TargetInfo] = {
    "e_form": TargetInfo("e_form", "eV/atom", "meV/atom", 1000.0, "formation energy per atom"),
    "gap": TargetInfo("gap", "eV", "meV", 1000.0, "PBE band gap", minimum=0.0),
    "log_kvrh": TargetInfo("log_kvrh", "log10(GPa)", "log10(GPa)", 1.0,
                           "log10 of the Voigt-Reuss-Hill bulk modulus K_VRH in GPa"),
    "log_gvrh": TargetInfo("log_gvrh", "log10(GPa)", "log10(GPa)", 1.0,
                           "log10 of the Voigt-Reuss-Hill shear modulus G_VRH in GPa"),
    "n": TargetInfo("n", "1", "1", 1.0, "refractive index"),
}
_ALIASES = {
    "formation_energy_per_atom": "e_form",
    "e_form_per_atom": "e_form",
    "eform": "e_form",
    "band_gap": "gap",
    "gappbe": "gap",
    "gap_pbe": "gap",
    "gap pbe": "gap",
    "log10(k_vrh)": "log_kvrh",
    "log10(g_vrh)": "log_gvrh",
    "log_k_vrh": "log_kvrh",
    "log_g_vrh": "log_gvrh",
    "refractive_index": "n",
}
_TABLES = {
    "flla_2015": "flla_2015.csv",
    "dielectric": "dielectric_constant.csv",
    "elastic": "elastic_tensor.csv",
}
_MP_ID = re.compile(r"^(mp|mvc)-\d+$")


# ------------------------------------------------------------------------------- split files


def _split_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    return (Path(data_dir) if data_dir is not None else default_data_dir()) / "materials_project" / "megnet_splits"


def megnet_split(target: str = "e_form", path: str | os.PathLike[str] | None = None,
                 data_dir: str | os.PathLike[str] | None = None) -> dict[str, dict[str, float]]:
    """The official MP-2018.6.1 split with labels: ``{"train"|"val"|"test": {mp-id: value}}``.

    Args:
        target: ``"e_form"`` (eV/atom) or ``"gap"`` (PBE, eV).
        path: the split file (``megnet_e_form.json.zip`` / ``megnet_gappbe.json.zip`` of
            jarvis-leaderboard); default in ``<data_dir>/materials_project/megnet_splits/``.
        data_dir: the shared data folder (default :func:`default_data_dir`).
    """
    target = MaterialsProject.resolve_target(target)
    if path is None:
        if target not in MEGNET_SPLIT_FILES:
            raise ValueError(f"MEGNet split files hold e_form and gap, not {target!r}")
        path = _split_dir(data_dir) / MEGNET_SPLIT_FILES[target]
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"MEGNet split file {path} not found (jarvis-leaderboard's "
            f"jarvis_leaderboard/benchmarks/AI/SinglePropertyPrediction/{path.name}, or set data_dir)")
    raw = read_json_any(path)
    if not isinstance(raw, dict) or not {"train", "test"} <= set(raw):
        raise ValueError(f"{path}: not a split file ({{'train','val','test'}} -> {{id: value}})")
    out: dict[str, dict[str, float]] = {}
    for split, values in raw.items():
        out[split] = {str(k): float(v) for k, v in values.items()}
    return out


def megnet_split_ids(path: str | os.PathLike[str] | None = None,
                     data_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """``{mp-id: split name}`` of the official MP-2018.6.1 split (60,000 / 5,000 / 4,239)."""
    split = megnet_split("e_form", path, data_dir)
    return {i: name for name, values in split.items() for i in values}


# ------------------------------------------------------------------------------- readers


def read_mp_csv(path: str | os.PathLike[str], required: Sequence[str] = ("material_id", "structure")):
    """A matminer-style MP CSV (``#`` reference lines on top) as a pandas DataFrame.

    Handles the shifted header of ``dielectric_constant.csv`` (each data row has one more
    leading field than the header: that field becomes the index) and checks that
    ``material_id`` holds MP ids, so a misaligned table fails loudly.
    """
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        line = f.readline()
        while line.startswith("#"):
            line = f.readline()
        header = next(csv.reader([line]))
        first = next(csv.reader(f), None)
    if first is None:
        raise ValueError(f"{path}: no data rows")
    if len(first) == len(header) + 1:
        index_col: int | bool = 0  # shifted header: the extra leading field is a row index
    elif len(first) == len(header):
        index_col = False
    else:
        raise ValueError(f"{path}: header has {len(header)} columns but the first row has {len(first)}")
    df = pd.read_csv(path, comment="#", index_col=index_col)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; has {list(df.columns)}")
    if "material_id" in df.columns:
        bad = [str(v) for v in df["material_id"].head(50) if not _MP_ID.match(str(v))]
        if bad:
            raise ValueError(f"{path}: material_id column holds {bad[0]!r}, not an MP id (misaligned columns?)")
    return df


def _log10(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return math.log10(x) if x > 0 and math.isfinite(x) else math.nan


def _table_entries(name: str, path: Path) -> list[CrystalEntry]:
    df = read_mp_csv(path)
    entries = []
    if name == "flla_2015":
        for k, (mid, s, e) in enumerate(zip(df["material_id"], df["structure"], df["formation_energy_per_atom"])):
            entries.append(CrystalEntry(str(mid), "pmg_repr", s, {"e_form": e}, where=f"row {k}"))
    elif name == "dielectric":
        for k, (mid, s, gap, n) in enumerate(zip(df["material_id"], df["structure"], df["band_gap"], df["n"])):
            entries.append(CrystalEntry(str(mid), "cif", s, {"gap": gap, "n": n}, where=f"row {k}"))
    elif name == "elastic":
        for k, (mid, s, kv, gv) in enumerate(zip(df["material_id"], df["structure"], df["K_VRH"], df["G_VRH"])):
            entries.append(CrystalEntry(str(mid), "cif", s, {"log_kvrh": _log10(kv), "log_gvrh": _log10(gv)},
                                        where=f"row {k}"))
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(name)
    return entries


def _json_entries(path: Path) -> list[CrystalEntry]:
    """Entries of ``mp.2018.6.1.json`` (a list of dicts; ``structure`` a CIF string or a
    pymatgen dict) or of a pandas ``orient="columns"`` dump of the same table."""
    raw = read_json_any(path)
    if isinstance(raw, dict) and "material_id" in raw and isinstance(raw["material_id"], dict):
        keys = list(raw["material_id"])
        raw = [{c: raw[c].get(k) for c in raw} for k in keys]
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a list of entries with material_id and structure")
    entries = []
    for k, d in enumerate(raw):
        if not isinstance(d, dict) or "structure" not in d or "material_id" not in d:
            keys = ", ".join(list(d)[:6]) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"{path} entry {k}: needs 'material_id' and 'structure' (found: {keys})")
        s = d["structure"]
        kind = "pmg_dict" if isinstance(s, dict) else "cif"
        labels = {
            "e_form": d.get("formation_energy_per_atom", d.get("e_form")),
            "gap": d.get("band_gap", d.get("gap")),
            "log_kvrh": _log10(d["K_VRH"]) if "K_VRH" in d else d.get("log_kvrh"),
            "log_gvrh": _log10(d["G_VRH"]) if "G_VRH" in d else d.get("log_gvrh"),
        }
        entries.append(CrystalEntry(str(d["material_id"]), kind, s, labels, where=f"entry {k}"))
    return entries


# ------------------------------------------------------------------------------- dataset


class MaterialsProject(CrystalDataset):
    """Materials Project crystals as contract ``Data`` (see the module docstring).

    Args:
        root: cache folder (default ``$EQUIFORMER_CACHE/materials_project``).
        structures: ``"flla_2015"``, ``"dielectric"``, ``"elastic"`` (tables in
            ``<data_dir>/materials_project/``) or a path to ``mp.2018.6.1.json[.zip|.gz]``
            or a :func:`fetch_materials_project` file.
        targets: label names (``e_form``, ``gap``, ``log_kvrh``, ``log_gvrh``, ``n``).
        split: ``"megnet"`` (the official MP-2018.6.1 split; structures without an id in it
            are left out) or None (no official split; a data module then splits at random).
        labels: ``"split"``: e_form / gap from the MEGNet split files (with ``split="megnet"``);
            ``"source"``: from the structure source.
        data_dir: the shared data folder (default ``$EQUIFORMER_SHARED_DATA`` or ``../shared/data``).
        split_dir: folder of ``megnet_e_form.json.zip`` / ``megnet_gappbe.json.zip``
            (default ``<data_dir>/materials_project/megnet_splits``).
        subset, dtype, force_reload, progress, processes: see :class:`CrystalDataset`.
    """

    NAME = "materials_project"
    LABELS = MP_LABELS
    DEFAULT_TARGETS = ("e_form",)
    ALIASES = _ALIASES

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        structures: str | os.PathLike[str] = "flla_2015",
        targets: str | Sequence[str] | None = None,
        split: str | None = "megnet",
        labels: str = "split",
        data_dir: str | os.PathLike[str] | None = None,
        split_dir: str | os.PathLike[str] | None = None,
        subset: int | None = None,
        dtype: torch.dtype | None = None,
        force_reload: bool = False,
        progress: bool = True,
        processes: int = 1,
    ) -> None:
        if split not in ("megnet", None):
            raise ValueError(f"MaterialsProject split must be 'megnet' or None, got {split!r}")
        if labels not in ("split", "source"):
            raise ValueError(f"MaterialsProject labels must be 'split' or 'source', got {labels!r}")
        self.split_protocol = split
        self.labels_from = labels
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        self.split_dir = Path(split_dir).expanduser() if split_dir is not None else _split_dir(self.data_dir)
        s = str(structures)
        if s in _TABLES:
            self.structures = s
            self.structures_path = self.data_dir / "materials_project" / _TABLES[s]
        else:
            self.structures_path = Path(s).expanduser()
            self.structures = "json"
        super().__init__(root=root, targets=targets, subset=subset, dtype=dtype, force_reload=force_reload,
                         progress=progress, processes=processes)
        if len(self) == 0:
            raise ValueError(f"{self.NAME}: no structure of {self.structures_path.name} has all targets "
                             f"{self.target_names} (split={split!r}, labels={labels!r})")

    # -- hooks ----------------------------------------------------------------------------------
    def source_files(self) -> list[Path]:
        if not self.structures_path.exists():
            if self.structures == "json":
                hint = f"; download it with download_megnet_mp2018() ({MEGNET_MP2018_URL})"
            else:
                hint = f" (the shared data folder: pass data_dir= or set {SHARED_DATA_ENV})"
            raise FileNotFoundError(f"{self.NAME}: structure file {self.structures_path} not found{hint}")
        return [self.structures_path]

    def cache_stem(self) -> str:
        tag = self.structures if self.structures != "json" else re.sub(r"[^A-Za-z0-9]+", "-", self.structures_path.name)
        return f"mp_{tag}"

    def read_entries(self) -> list[CrystalEntry]:
        if self.structures == "json":
            return _json_entries(self.structures_path)
        return _table_entries(self.structures, self.structures_path)

    def _split_file(self, target: str) -> Path:
        return self.split_dir / MEGNET_SPLIT_FILES[target]

    def official_split_labels(self) -> dict[str, str] | None:
        if self.split_protocol != "megnet":
            return None
        return megnet_split_ids(self._split_file("e_form"))

    def label_overrides(self) -> dict[str, dict[str, float]] | None:
        if self.split_protocol != "megnet" or self.labels_from != "split":
            return None
        out = {}
        for t in self.target_names:
            if t in MEGNET_SPLIT_FILES:
                split = megnet_split(t, self._split_file(t))
                out[t] = {i: v for values in split.values() for i, v in values.items()}
        return out


class MPFormationEnergy(MaterialsProject):
    """Formation energy per atom (eV/atom) of MP-2018.6.1 with the official MEGNet split
    (``MaterialsProject(targets="e_form")``); offline ``structures="flla_2015"`` gives 3,909
    officially split structures."""

    DEFAULT_TARGETS = ("e_form",)

    def __init__(self, root: str | os.PathLike[str] | None = None, structures: str | os.PathLike[str] = "flla_2015",
                 split: str | None = "megnet", **kwargs: Any) -> None:
        kwargs.setdefault("targets", ("e_form",))
        super().__init__(root=root, structures=structures, split=split, **kwargs)


class MPBandGap(MaterialsProject):
    """PBE band gap (eV) of MP-2018.6.1 with the official MEGNet split; labels from
    ``megnet_gappbe`` (``labels="split"``) or, for ``structures="dielectric"`` with
    ``labels="source"``, the dielectric table's ``band_gap``."""

    DEFAULT_TARGETS = ("gap",)

    def __init__(self, root: str | os.PathLike[str] | None = None, structures: str | os.PathLike[str] = "flla_2015",
                 split: str | None = "megnet", **kwargs: Any) -> None:
        kwargs.setdefault("targets", ("gap",))
        super().__init__(root=root, structures=structures, split=split, **kwargs)


class MPElastic(MaterialsProject):
    """log10 K_VRH and log10 G_VRH (GPa) of ``elastic_tensor.csv`` (1,181 MP structures),
    as MEGNet and matbench model them; no official split (``split=None``)."""

    DEFAULT_TARGETS = ("log_kvrh", "log_gvrh")

    def __init__(self, root: str | os.PathLike[str] | None = None, structures: str | os.PathLike[str] = "elastic",
                 split: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("targets", ("log_kvrh", "log_gvrh"))
        kwargs.setdefault("labels", "source")
        super().__init__(root=root, structures=structures, split=split, **kwargs)


# ------------------------------------------------------------------------------- downloads


def download_megnet_mp2018(root: str | os.PathLike[str]) -> Path:
    """Download MEGNet's ``mp.2018.6.1.json.zip`` (69,239 structures as CIF strings with
    ``formation_energy_per_atom`` and ``band_gap``) into ``root``; returns the zip's path,
    which ``MaterialsProject(structures=path)`` reads directly. Needs internet access."""
    return download(MEGNET_MP2018_URL, Path(root) / MEGNET_MP2018_FILE, "MEGNet MP-2018.6.1 structures")


#: fields fetched by :func:`fetch_materials_project`
MP_API_FIELDS = ("material_id", "structure", "formation_energy_per_atom", "band_gap", "bulk_modulus", "shear_modulus")


def fetch_materials_project(
    path: str | os.PathLike[str],
    material_ids: Sequence[str] | None = None,
    api_key: str | None = None,
    **criteria: Any,
) -> Path:
    """Fetch structures and labels from the Materials Project API into a JSON file.

    Uses the ``mp-api`` client (``pip install mp-api``, not a dependency of equiformer):
    ``MPRester(api_key).materials.summary.search(material_ids=..., fields=..., **criteria)``.
    The file is a list of ``{"material_id", "structure" (pymatgen dict),
    "formation_energy_per_atom" (eV/atom), "band_gap" (eV), "K_VRH", "G_VRH" (GPa, when
    MP has them)}``, read by ``MaterialsProject(structures=path, split=None)``.

    Args:
        path: output JSON file (overwritten).
        material_ids: ids to fetch, e.g. the MEGNet split's (:func:`megnet_split_ids`).
        api_key: Materials Project API key; default the ``MP_API_KEY`` environment variable.
        criteria: further ``summary.search`` filters, e.g. ``num_sites=(1, 25)``.

    Returns:
        ``path``.
    """
    try:
        from mp_api.client import MPRester
    except ImportError:
        raise ImportError("fetch_materials_project needs the Materials Project client: pip install mp-api") from None
    key = api_key or os.environ.get("MP_API_KEY")
    if not key:
        raise ValueError("no Materials Project API key: pass api_key= or set MP_API_KEY "
                         "(https://next-gen.materialsproject.org/api)")
    if material_ids is None and not criteria:
        raise ValueError("give material_ids or search criteria; fetching all of the Materials Project is not intended")
    with MPRester(api_key=key) as mpr:
        docs = mpr.materials.summary.search(
            material_ids=list(material_ids) if material_ids is not None else None,
            fields=list(MP_API_FIELDS),
            **criteria,
        )
    out = []
    for d in docs:
        entry: dict[str, Any] = {
            "material_id": str(d.material_id),
            "structure": d.structure.as_dict(),
            "formation_energy_per_atom": d.formation_energy_per_atom,
            "band_gap": d.band_gap,
        }
        for key_, attr in (("K_VRH", "bulk_modulus"), ("G_VRH", "shear_modulus")):
            mod = getattr(d, attr, None)
            if isinstance(mod, dict) and mod.get("vrh") is not None:
                entry[key_] = float(mod["vrh"])
        out.append(entry)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f)
    os.replace(tmp, path)
    return path
