"""Shared machinery of the crystal datasets (Materials Project, JARVIS, matbench, perovskites).

A crystal source (a CSV of pymatgen dictionaries, a JSON of CIF strings, a folder of POSCARs,
...) is read into a list of :class:`CrystalEntry` (an id, the raw structure, its labels and,
where the source has one, the split it belongs to). :func:`process_entries` validates every
structure through the data contract (:func:`equiformer.data.contract.make_data`: unknown
elements, non-finite coordinates, degenerate cells, atoms closer than 0.1 Å; partial
occupancies through :func:`equiformer.data.convert.pymatgen_record`) and packs the valid ones
into flat tensors, cached on disk (:mod:`equiformer.datasets.cache`). Invalid structures are
not dropped silently: each is kept in :attr:`CrystalDataset.skipped` with its reason, and a
warning gives the count.

:class:`CrystalDataset` serves contract ``Data`` objects:

=================  ============  ===========================================================
field              shape         meaning
=================  ============  ===========================================================
``z``              [N] long      atomic numbers
``pos``            [N, 3]        Cartesian positions, Å
``cell``           [1, 3, 3]     lattice vectors as rows, Å
``pbc``            [1, 3] bool   all True
``y``              [1, T]        the selected targets, units in :attr:`target_infos`
``idx``            [1] long      row of the item in the dataset
``material_id``    str           the source's id (``mp-1234``, ``JVASP-1002``, ...)
=================  ============  ===========================================================

Rows whose selected targets are missing (NaN, JARVIS's ``"na"``) are left out of the dataset
(:attr:`CrystalDataset.num_missing` counts them); they are not structure errors.
"""

from __future__ import annotations

import ast
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch_geometric.data import Data

from equiformer.data.contract import ATOMIC_NUMBERS, StructureError
from equiformer.data.records import Record, to_data
from equiformer.datasets.cache import (
    cache_file,
    cache_key,
    default_cache_root,
    file_fingerprint,
    load_tensors,
    save_tensors,
    strings_to_tensor,
    tensors_to_strings,
)
from equiformer.datasets.splits import resolve_index
from equiformer.datasets.targets import TargetInfo

__all__ = [
    "CRYSTAL_CACHE_VERSION",
    "SHARED_DATA_ENV",
    "CrystalDataset",
    "CrystalEntry",
    "SkippedStructure",
    "default_data_dir",
    "entry_record",
    "process_entries",
]

logger = logging.getLogger("equiformer.datasets")

#: bump when processing changes: it is part of every crystal cache key
CRYSTAL_CACHE_VERSION = 1
#: environment variable naming the folder of the shared offline data (``.../shared/data``)
SHARED_DATA_ENV = "EQUIFORMER_SHARED_DATA"
#: split names in the order the data modules use
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
#: the largest atomic number + 1 (width of the atomref tables)
NUM_ELEMENTS = 119


def default_data_dir() -> Path:
    """Folder of the shared offline data: ``$EQUIFORMER_SHARED_DATA``, else ``../shared/data``
    next to a source checkout of the project (where the project's tests find it)."""
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --------------------------------------------------------------------------- entries


@dataclass
class CrystalEntry:
    """One structure of a source, before validation.

    Attributes:
        id: the source's id (``mp-1234``, ``JVASP-1002``, a file name, ...).
        kind: how ``payload`` is read (see :func:`entry_record`): ``"pmg_repr"`` (a pymatgen
            dict written as a Python repr), ``"pmg_dict"``, ``"cif"`` (CIF text), ``"poscar"``
            (POSCAR text), ``"jarvis"`` (a jarvis-tools ``atoms`` dict).
        payload: the raw structure.
        labels: ``{label name: value}``; NaN or absent = missing.
        split: the split the source assigns (``"train"``, ``"val"``, ``"test"``) or None.
        where: position in the source for messages, e.g. ``"row 12"``.
    """

    id: str
    kind: str
    payload: Any
    labels: dict[str, float] = field(default_factory=dict)
    split: str | None = None
    where: str = ""


@dataclass(frozen=True)
class SkippedStructure:
    """A structure left out of a dataset, with the reason (the data contract's message)."""

    id: str
    reason: str
    index: int  # position of the entry in its source


def _pymatgen_structure(d: Mapping[str, Any], src: str) -> Any:
    from pymatgen.core import Structure

    if not isinstance(d, Mapping) or "sites" not in d or "lattice" not in d:
        keys = ", ".join(list(d)[:6]) if isinstance(d, Mapping) else type(d).__name__
        raise StructureError(f"{src}: not a pymatgen Structure dictionary (found: {keys})")
    try:
        return Structure.from_dict(d)
    except Exception as exc:  # noqa: BLE001 - pymatgen raises assorted errors on bad dicts
        raise StructureError(f"{src}: cannot build a pymatgen Structure ({type(exc).__name__}: {exc})") from None


def _jarvis_record(d: Mapping[str, Any], src: str) -> Record:
    """Record of a jarvis-tools ``Atoms.to_dict()``: ``lattice_mat`` (rows, Å), ``coords``
    (fractional unless ``cartesian`` is true), ``elements`` (symbols)."""
    try:
        lattice = np.asarray(d["lattice_mat"], dtype=np.float64).reshape(3, 3)
        coords = np.asarray(d["coords"], dtype=np.float64).reshape(-1, 3)
        elements = list(d["elements"])
    except KeyError as exc:
        raise StructureError(
            f"{src}: JARVIS atoms dict has no {exc.args[0]!r} (needs lattice_mat, coords, elements)") from None
    except (TypeError, ValueError) as exc:
        raise StructureError(f"{src}: malformed JARVIS atoms dict ({exc})") from None
    if len(elements) != len(coords):
        raise StructureError(f"{src}: {len(elements)} elements but {len(coords)} coordinates")
    z = []
    for k, s in enumerate(elements):
        key = str(s).strip()
        key = key[:1].upper() + key[1:].lower()
        if key not in ATOMIC_NUMBERS:
            raise StructureError(f"{src}: atom {k} has unknown element {s!r}")
        z.append(ATOMIC_NUMBERS[key])
    cartesian = d.get("cartesian", False)
    if isinstance(cartesian, str):
        cartesian = cartesian.strip().lower() in ("true", "1", "yes")
    pos = coords if cartesian else coords @ lattice
    return Record(z=np.asarray(z, dtype=np.int64), pos=pos, cell=lattice, pbc=np.ones(3, dtype=bool))


def entry_record(kind: str, payload: Any, src: str) -> Record:
    """Turn a raw structure into a :class:`~equiformer.data.records.Record`.

    Raises:
        StructureError: unreadable payload, partial occupancies, missing cell, more than one
            structure in a CIF; the message starts with ``src``.
    """
    from equiformer.data.convert import pymatgen_record

    if kind == "pmg_repr":
        try:
            d = ast.literal_eval(payload) if isinstance(payload, str) else payload
        except (ValueError, SyntaxError) as exc:
            raise StructureError(
                f"{src}: structure is not a Python dict literal ({type(exc).__name__}: {exc})") from None
        return pymatgen_record(_pymatgen_structure(d, src), src)
    if kind == "pmg_dict":
        return pymatgen_record(_pymatgen_structure(payload, src), src)
    if kind == "cif":
        from equiformer.data.io import _cif  # the project's CIF reader (blocks, cells, occupancies)

        if not isinstance(payload, str) or not payload.strip():
            raise StructureError(f"{src}: empty CIF")
        records = _cif(payload, src)
        if len(records) != 1:
            raise StructureError(f"{src}: CIF holds {len(records)} structures, expected one")
        return records[0]
    if kind == "poscar":
        from equiformer.data.poscar import parse_poscar

        (rec,) = parse_poscar(payload, src)
        return rec
    if kind == "jarvis":
        if not isinstance(payload, Mapping):
            raise StructureError(f"{src}: JARVIS 'atoms' is a {type(payload).__name__}, not a dict")
        return _jarvis_record(payload, src)
    raise ValueError(f"unknown structure kind {kind!r}")


def _worker_init() -> None:
    torch.set_num_threads(1)  # one process per core; no nested thread pools


def _process_one(args: tuple[int, str, str, Any, str]) -> tuple[int, Any]:
    """``(index, (z, pos, cell))`` or ``(index, reason)`` for one entry (picklable worker)."""
    index, src, kind, payload, where = args
    try:
        rec = entry_record(kind, payload, src)
        if where and not rec.where:
            rec.where = where
        data = to_data(rec, src, dtype=torch.float64)
        pbc = data.pbc.view(3)
        if not bool(pbc.all()):
            raise StructureError(f"{src}: not periodic in all three directions (pbc={pbc.tolist()})")
        return index, (data.z.numpy().astype(np.uint8), data.pos.numpy(), data.cell.view(3, 3).numpy())
    except StructureError as exc:
        return index, str(exc)


def process_entries(
    entries: Sequence[CrystalEntry],
    label_names: Sequence[str],
    source: str,
    progress: bool = True,
    processes: int = 1,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Validate and pack entries into flat tensors.

    Args:
        entries: the source's structures in order.
        label_names: label columns to store (missing ones become NaN).
        source: name of the source for messages (e.g. ``"flla_2015.csv"``).
        progress: progress bar.
        processes: worker processes (1 = in this process).

    Returns:
        ``(tensors, meta)``: ``z`` uint8 [A], ``pos`` float64 [A,3] Å, ``cell`` float64
        [M,3,3] Å, ``ptr`` long [M+1], ``labels`` float64 [M,L], ``ids``/``ids_ptr`` (UTF-8
        bytes + offsets), ``source_index`` long [M] (position in ``entries``), ``split`` int8
        [M] (index into ``meta["split_names"]``, -1 = none), ``entry_ids``/``entry_ids_ptr``
        and ``entry_labels`` [E,L] of all entries (skipped ones included, for split protocols
        defined on the whole source); ``meta`` holds ``label_names``,
        ``split_names`` and ``skipped`` (``[[id, reason, index], ...]``).
    """
    from tqdm.auto import tqdm

    label_names = list(label_names)
    seen: dict[str, int] = {}
    jobs = []
    skipped: list[list[Any]] = []
    for i, e in enumerate(entries):
        if e.id in seen:
            skipped.append([e.id, f"{source} {e.where or i}: duplicate id {e.id!r} (first at entry {seen[e.id]})", i])
            continue
        seen[e.id] = i
        src = f"{source} {e.id}"
        jobs.append((i, src, e.kind, e.payload, e.where))

    results: dict[int, Any] = {}
    bar = tqdm(total=len(jobs), desc=f"{source}: processing structures", unit="struct", disable=not progress,
               mininterval=0.5)
    if processes > 1 and len(jobs) >= 4 * processes:
        import multiprocessing as mp

        # fork where available (as torch's DataLoader): works from scripts without a __main__ guard
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(processes, initializer=_worker_init) as pool:
            chunk = max(1, min(64, len(jobs) // (4 * processes)))
            for index, res in pool.imap_unordered(_process_one, jobs, chunksize=chunk):
                results[index] = res
                bar.update(1)
    else:
        for job in jobs:
            index, res = _process_one(job)
            results[index] = res
            bar.update(1)
    bar.close()

    split_names = list(SPLIT_NAMES) + sorted({e.split for e in entries if e.split and e.split not in SPLIT_NAMES})
    zs, poss, cells, counts, labels, ids, src_index, splits = [], [], [], [], [], [], [], []
    for i, e in enumerate(entries):
        res = results.get(i)
        if res is None:
            continue
        if isinstance(res, str):
            skipped.append([e.id, res, i])
            continue
        z, pos, cell = res
        zs.append(z)
        poss.append(pos)
        cells.append(cell)
        counts.append(len(z))
        labels.append([_as_float(e.labels.get(n)) for n in label_names])
        ids.append(e.id)
        src_index.append(i)
        splits.append(split_names.index(e.split) if e.split else -1)
    skipped.sort(key=lambda s: s[2])
    entry_ids, entry_ids_ptr = strings_to_tensor([e.id for e in entries])
    entry_labels = torch.tensor([[_as_float(e.labels.get(n)) for n in label_names] for e in entries],
                                dtype=torch.float64).reshape(len(entries), len(label_names))
    m = len(ids)
    ptr = np.zeros(m + 1, dtype=np.int64)
    ptr[1:] = np.cumsum(counts) if m else []
    id_buf, id_ptr = strings_to_tensor(ids)
    tensors = {
        "z": torch.from_numpy(np.concatenate(zs) if m else np.zeros(0, np.uint8)),
        "pos": torch.from_numpy(np.concatenate(poss) if m else np.zeros((0, 3))),
        "cell": torch.from_numpy(np.stack(cells) if m else np.zeros((0, 3, 3))),
        "ptr": torch.from_numpy(ptr),
        "labels": torch.tensor(labels, dtype=torch.float64).reshape(m, len(label_names)),
        "ids": id_buf,
        "ids_ptr": id_ptr,
        "source_index": torch.tensor(src_index, dtype=torch.long),
        "split": torch.tensor(splits, dtype=torch.int8),
        "entry_ids": entry_ids,
        "entry_ids_ptr": entry_ids_ptr,
        "entry_labels": entry_labels,
    }
    meta = {"label_names": label_names, "split_names": split_names, "skipped": skipped, "num_entries": len(entries),
            "source": source}
    return tensors, meta


def _as_float(v: Any) -> float:
    if v is None:
        return math.nan
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("", "na", "nan", "none", "null"):
            return math.nan
        try:
            return float(s)
        except ValueError:
            return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------- dataset


class CrystalDataset(Dataset):
    """A processed, cached crystal source as a map-style dataset of contract ``Data``.

    Subclasses name the source and read it: they implement :meth:`source_files` (paths whose
    fingerprints key the cache), :meth:`read_entries` and :attr:`LABELS`; optionally
    :meth:`official_split_labels` (an id -> split mapping applied after loading) and
    :meth:`label_overrides` (id -> labels replacing the source's, e.g. a split file's values).

    Args:
        root: cache folder (default ``$EQUIFORMER_CACHE/<name>`` or ``~/.cache/equiformer/<name>``).
        targets: label names served in ``y`` (order kept); default the subclass's ``DEFAULT_TARGETS``.
        subset: process only the first ``subset`` entries of the source (tests, quick runs).
        dtype: float dtype of ``pos``/``cell``/``y`` (default torch's default dtype).
        force_reload: reprocess even when a cache file exists.
        progress: progress bar while processing.
        processes: worker processes for processing (the first load only).
    """

    #: name of the dataset (cache folder and messages)
    NAME = "crystals"
    #: the labels the source provides, with units
    LABELS: dict[str, TargetInfo] = {}
    DEFAULT_TARGETS: tuple[str, ...] = ()
    #: other spellings of label names (lower case) -> canonical name
    ALIASES: dict[str, str] = {}

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        targets: str | Sequence[str] | None = None,
        subset: int | None = None,
        dtype: torch.dtype | None = None,
        force_reload: bool = False,
        progress: bool = True,
        processes: int = 1,
    ) -> None:
        if subset is not None and int(subset) < 1:
            raise ValueError(f"{self.NAME}: subset must be >= 1, got {subset}")
        self.subset = None if subset is None else int(subset)
        self.root = Path(root).expanduser() if root is not None else default_cache_root(self.NAME)
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.target_names: list[str] = self.resolve_targets(targets)
        t0 = time.perf_counter()
        tensors, meta = self._load(force_reload, progress, processes)
        self.load_seconds = time.perf_counter() - t0
        self._setup_tables(tensors, meta)

    # -- hooks --------------------------------------------------------------------------------
    def source_files(self) -> list[Path]:
        """Files the entries are read from (their fingerprints key the cache)."""
        raise NotImplementedError

    def cache_stem(self) -> str:
        """File stem of the cache (distinct per source configuration)."""
        return self.NAME

    def cache_options(self) -> dict[str, Any]:
        """Processing options that change the cached content (besides files, version, subset)."""
        return {}

    def read_entries(self) -> list[CrystalEntry]:
        """All entries of the source, in source order."""
        raise NotImplementedError

    def label_names(self) -> list[str]:
        """Label columns stored in the cache."""
        return list(self.LABELS)

    def official_split_labels(self) -> dict[str, str] | None:
        """``{id: split name}`` of the dataset's official split, or None (then the source's
        own split assignment, if any, is used)."""
        return None

    def label_overrides(self) -> dict[str, dict[str, float]] | None:
        """``{label: {id: value}}`` replacing the source's values of those labels, or None."""
        return None

    # -- targets --------------------------------------------------------------------------------
    @classmethod
    def resolve_target(cls, name: str) -> str:
        key = str(name).strip()
        if key in cls.LABELS:
            return key
        canonical = cls.ALIASES.get(key.lower())
        if canonical is None:
            lower = {k.lower(): k for k in cls.LABELS}
            canonical = lower.get(key.lower())
        if canonical is None:
            raise ValueError(f"unknown {cls.NAME} target {name!r}; choose from {', '.join(cls.LABELS)}")
        return canonical

    def resolve_targets(self, targets: str | Sequence[str] | None) -> list[str]:
        """Canonical target names; a string may list several (``"e_form,gap"``)."""
        if targets is None:
            targets = list(self.DEFAULT_TARGETS) or list(self.LABELS)[:1]
        if isinstance(targets, str):
            targets = [t for t in targets.replace(" ", ",").split(",") if t]
        names = [self.resolve_target(t) for t in targets]
        if not names:
            raise ValueError(f"no {self.NAME} target selected")
        if len(set(names)) != len(names):
            raise ValueError(f"{self.NAME} targets listed twice: {names}")
        return names

    @property
    def target_infos(self) -> list[TargetInfo]:
        return [self.LABELS[t] for t in self.target_names]

    # -- loading --------------------------------------------------------------------------------
    def _load(self, force_reload: bool, progress: bool, processes: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        stem = self.cache_stem() if self.subset is None else f"{self.cache_stem()}_first{self.subset}"
        try:
            paths = self.source_files()
            for p in paths:
                if not Path(p).exists():
                    raise FileNotFoundError(f"{self.NAME}: source file {p} not found")
        except FileNotFoundError:
            found = None if force_reload else self._processed_without_source(stem)
            if found is None:
                raise
            self.cache_path, tensors, meta = found
            self.cache_hit = True
            self._report_skipped(meta)
            return tensors, meta
        key = cache_key(version=CRYSTAL_CACHE_VERSION, dataset=self.NAME, files=file_fingerprint(paths),
                        subset=self.subset, labels=self.label_names(), options=self.cache_options())
        self.cache_path = cache_file(self.root, stem, key)
        loaded = None if force_reload else load_tensors(self.cache_path)
        if loaded is not None and loaded[1].get("key") == key:
            self.cache_hit = True
            tensors, meta = loaded
        else:
            entries = self.read_entries()
            if self.subset is not None:
                entries = entries[: self.subset]
            name = paths[0].name if paths else self.NAME
            tensors, meta = process_entries(entries, self.label_names(), name, progress=progress, processes=processes)
            meta.update(key=key, version=CRYSTAL_CACHE_VERSION, dataset=self.NAME, subset=self.subset)
            save_tensors(self.cache_path, tensors, meta)
            self.cache_hit = False
        self._report_skipped(meta)
        return tensors, meta

    def _processed_without_source(self, stem: str) -> tuple[Path, dict[str, Tensor], dict[str, Any]] | None:
        """Newest ``<root>/<stem>_*.safetensors`` of this code version (a machine without the raw files)."""
        if not self.root.is_dir():
            return None
        for path in sorted(self.root.glob(f"{stem}_*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True):
            if path.name.rsplit("_", 1)[0] != stem:
                continue
            loaded = load_tensors(path)
            if loaded is not None and loaded[1].get("version") == CRYSTAL_CACHE_VERSION:
                return path, loaded[0], loaded[1]
        return None

    def _report_skipped(self, meta: dict[str, Any]) -> None:
        self.skipped: list[SkippedStructure] = [SkippedStructure(str(i), str(r), int(k)) for i, r, k in meta["skipped"]]
        if self.skipped:
            first = self.skipped[0].reason
            logger.warning("%s: %d of %d structures rejected by the data contract and left out (first: %s); "
                           "see .skipped", self.NAME, len(self.skipped), int(meta["num_entries"]), first)

    def _setup_tables(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.meta = meta
        self.num_entries = int(meta["num_entries"])
        all_ids = tensors_to_strings(tensors["ids"], tensors["ids_ptr"])
        labels = tensors["labels"].to(torch.float64).clone()
        names = list(meta["label_names"])
        # every entry of the source, skipped ones included (for split protocols on the whole source)
        self.entry_ids: list[str] = tensors_to_strings(tensors["entry_ids"], tensors["entry_ids_ptr"])
        self.entry_labels: Tensor = tensors["entry_labels"]
        self.label_columns: list[str] = names
        overrides = self.label_overrides() or {}
        self.num_overridden: dict[str, int] = {}
        for label, values in overrides.items():
            col = names.index(label)
            new = torch.tensor([_as_float(values.get(i)) for i in all_ids], dtype=torch.float64)
            self.num_overridden[label] = int(torch.isfinite(new).sum())
            labels[:, col] = new
        split_names = list(meta["split_names"])
        split_codes = tensors["split"].long()
        official = self.official_split_labels()
        if official is not None:
            for s in sorted(set(official.values()) - set(split_names)):
                split_names.append(s)
            split_codes = torch.tensor([split_names.index(official[i]) if i in official else -1 for i in all_ids],
                                       dtype=torch.long)
        cols = [names.index(t) for t in self.target_names]
        y_all = labels[:, cols]
        has_y = torch.isfinite(y_all).all(dim=1)
        in_split = split_codes >= 0 if official is not None else torch.ones(len(all_ids), dtype=torch.bool)
        self.num_outside_split = int((~in_split).sum())
        self.num_missing = int((~has_y & in_split).sum())
        keep = has_y & in_split
        rows = torch.nonzero(keep).view(-1)

        ptr_all = tensors["ptr"]
        counts = (ptr_all[1:] - ptr_all[:-1])[rows]
        new_start = torch.cumsum(counts, 0) - counts
        atom_idx = torch.repeat_interleave(ptr_all[:-1][rows] - new_start, counts) + torch.arange(int(counts.sum()))
        self.z: Tensor = tensors["z"].long()[atom_idx]
        self._pos: Tensor = tensors["pos"][atom_idx].to(self.dtype)
        self.pos64: Tensor = tensors["pos"][atom_idx].to(torch.float64)
        self.cell64: Tensor = tensors["cell"][rows].to(torch.float64)
        self._cell: Tensor = self.cell64.to(self.dtype)
        self.num_atoms: Tensor = counts
        self.ptr: Tensor = torch.zeros(len(rows) + 1, dtype=torch.long)
        self.ptr[1:] = torch.cumsum(counts, 0)
        self._ptr_list: list[int] = self.ptr.tolist()
        self.y_table: Tensor = y_all[rows]  # float64 [M, T]
        self._y: Tensor = self.y_table.to(self.dtype)
        self.label_table: Tensor = labels[rows]
        self.ids: list[str] = [all_ids[r] for r in rows.tolist()]
        self.source_index: Tensor = tensors["source_index"][rows]
        self._split_codes: Tensor = split_codes[rows]
        self._split_names = split_names
        self._index = {mid: k for k, mid in enumerate(self.ids)}

    # -- items --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Data:
        i = resolve_index(i, len(self), self.NAME, "structures")
        a, b = self._ptr_list[i], self._ptr_list[i + 1]
        return Data(
            z=self.z[a:b].clone(),
            pos=self._pos[a:b].clone(),
            cell=self._cell[i : i + 1].clone(),
            pbc=torch.ones(1, 3, dtype=torch.bool),
            y=self._y[i : i + 1].clone(),
            idx=torch.tensor([i]),
            material_id=self.ids[i],
        )

    def index_of(self, material_id: str) -> int:
        """Row of a structure by its id; ``KeyError`` if absent (skipped, missing label, ...)."""
        return self._index[material_id]

    @property
    def has_official_split(self) -> bool:
        return bool((self._split_codes >= 0).any())

    def official_split(self) -> dict[str, Tensor] | None:
        """``{split name: LongTensor of rows}`` of the source's / official split, or None when
        the dataset has none. Names the source does not use are absent (e.g. no ``"val"``)."""
        if not self.has_official_split:
            return None
        out = {}
        for code, name in enumerate(self._split_names):
            idx = torch.nonzero(self._split_codes == code).view(-1)
            if len(idx):
                out[name] = idx
        return out

    def atomrefs(self) -> Tensor:
        """[T, 119] float64 zeros: crystal targets here are intensive, no per-element reference."""
        return torch.zeros(len(self.target_names), NUM_ELEMENTS, dtype=torch.float64)

    def summary(self) -> dict[str, Any]:
        """Counts for reports: structures kept, skipped (with reasons), missing labels, per split."""
        split = self.official_split() or {}
        return {
            "dataset": self.NAME,
            "entries": self.num_entries,
            "kept": len(self),
            "skipped": len(self.skipped),
            "missing_targets": self.num_missing,
            "outside_official_split": self.num_outside_split,
            "split": {k: int(len(v)) for k, v in split.items()},
        }

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} structures, targets={self.target_names}, "
                f"skipped={len(self.skipped)}, cache={self.cache_path})")


def read_json_any(path: Path) -> Any:
    """JSON from ``.json``, ``.json.gz`` or a ``.zip`` holding one ``.json`` member."""
    import gzip
    import json
    import zipfile

    name = path.name.lower()
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                members = [m for m in zf.namelist() if m.lower().endswith(".json")]
                if len(members) != 1:
                    raise ValueError(f"{path}: expected one .json file in the zip, found {members or 'none'}")
                return json.loads(zf.read(members[0]))
        if name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return json.load(f)
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None


def download(url: str, path: Path, what: str) -> Path:
    """Download ``url`` to ``path`` (atomic rename; skipped when ``path`` exists)."""
    import shutil
    import tempfile
    import urllib.request

    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("downloading %s from %s to %s", what, url, path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "equiformer"})
        with urllib.request.urlopen(req, timeout=60) as r, open(tmp, "wb") as f:  # noqa: S310 - fixed https URLs
            shutil.copyfileobj(r, f, length=1 << 20)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def generic_target(name: str, unit: str = "", description: str = "") -> TargetInfo:
    """TargetInfo for a label without a known unit (reported in its own unit)."""
    return TargetInfo(name, unit, unit, 1.0, description or name)

