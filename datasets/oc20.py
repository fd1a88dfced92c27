"""Open Catalyst 2020 (OC20): adsorbate + slab structures with DFT energies and forces.

Three sources, one output: every item is a contract ``Data`` (:mod:`equiformer.data.contract`)

=============  ==================  =====================================================
field          shape, dtype        meaning
=============  ==================  =====================================================
``z``          [N] long            atomic numbers
``pos``        [N, 3] float        positions, Å
``cell``       [1, 3, 3] float     lattice rows, Å
``pbc``        [1, 3] bool         (True, True, True): OC20 slabs are periodic in all three
                                   directions (vacuum along c), as fairchem treats them
``tags``       [N] long            0 subsurface (fixed) slab atom, 1 surface atom, 2 adsorbate
``fixed``      [N] bool            atom held fixed in the DFT relaxation
``energy``     [1] float           energy of this structure, eV (S2EF: referenced as stored)
``forces``     [N, 3] float        forces, eV/Å (fixed atoms included, as stored)
``y_relaxed``  [1] float           IS2RE: relaxed energy, eV (also ``y`` [1, 1])
``y_init``     [1] float           IS2RE: energy of the initial structure, eV
``pos_relaxed`` [N, 3] float       IS2RS: relaxed positions, Å
``sid``        [1] long            system id (``random<sid>``)
``fid``        [1] long            frame id within the system's relaxation
=============  ==================  =====================================================

- :class:`OC20LMDB`: the official fairchem/OCP LMDB files (S2EF, IS2RE/IS2RS), one file or a
  folder of shards, read-only, memory-mapped, multi-worker safe, values decoded by a
  restricted unpickler (:mod:`equiformer.datasets.ocp_pickle`; never plain ``pickle``). Field
  names of both the original (PyG 1.x: ``y``, ``force``) and current fairchem (``energy``,
  ``forces``) LMDBs are understood. Needs ``pip install lmdb``.
- :class:`OC20Trajectories`: frames of ASE relaxation trajectories (``.traj`` / extxyz), e.g.
  the 30 real OC20 trajectories of ``oc20_relaxation_trajectories.tar.gz`` (5,249 frames,
  total DFT energies, not referenced; tags all 0 there). The archive is extracted into the
  dataset's ``root`` (a cache folder), processed once into a safetensors cache, and split
  *by trajectory* (:meth:`OC20Trajectories.split`) so that frames of one relaxation never
  appear in two splits.
- :class:`OC20RelaxationPairs`: IS2RE-style items from the same trajectories: the first
  frame's structure with ``y_init`` (its energy), ``y_relaxed`` = ``y`` (the last frame's
  energy) and ``pos_relaxed`` (the last frame's positions).
- ASE databases (``bulks.db``): :class:`equiformer.datasets.ase_db.ASEDatabase`.

Downloads of the public splits: :mod:`equiformer.datasets.download`.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch_geometric.data import Data

from equiformer.data.contract import StructureError, make_data, validate_structure
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
from equiformer.datasets.ocp_lmdb import LMDBShards
from equiformer.datasets.ocp_pickle import ocp_fields
from equiformer.datasets.splits import DEFAULT_SPLIT_SEED, SizeSpec, random_split_indices, resolve_index, resolve_split_sizes
from equiformer.datasets.trajectories import TRAJECTORY_SUFFIXES, read_frames

__all__ = [
    "OC20LMDB",
    "OC20RelaxationPairs",
    "OC20Trajectories",
    "OC20_PBC",
    "OC20_TRAJECTORIES_FILE",
    "SHARED_DATA_ENV",
    "default_trajectories_source",
    "ocp_to_data",
]

#: OC20 slabs are periodic along all three lattice vectors
OC20_PBC = (True, True, True)
#: environment variable naming the folder of the project's shared offline data
SHARED_DATA_ENV = "EQUIFORMER_SHARED_DATA"
#: the 30 real OC20 relaxations, relative to the shared data folder
OC20_TRAJECTORIES_FILE = "oc20/oc20_relaxation_trajectories.tar.gz"
#: bump when processing changes (part of the cache key)
TRAJECTORIES_CACHE_VERSION = 1
#: default split of trajectories: fractions of the trajectories, the test split takes the rest
TRAJECTORY_SPLIT_SIZES: dict[str, SizeSpec] = {"train": 0.8, "val": 0.1, "test": None}


# ---------------------------------------------------------------------------------------------
# OCP Data object -> contract
# ---------------------------------------------------------------------------------------------


def _array(v: Any) -> np.ndarray:
    if isinstance(v, Tensor):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def _scalar(v: Any, name: str, source: str) -> float:
    a = _array(v)
    if a.size != 1:
        raise StructureError(f"{source}: field {name!r} has {a.size} values, expected one")
    return float(a.reshape(-1)[0])


def _ident(v: Any) -> Tensor | str:
    """An OCP id (int, numpy int, 1-element tensor or string) as long [1] or str."""
    if isinstance(v, str):
        m = re.fullmatch(r"random(\d+)", v)
        return torch.tensor([int(m.group(1))]) if m else v
    a = _array(v)
    if a.size == 1 and (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        return torch.tensor([int(a.reshape(-1)[0])])
    return str(v)


def _first(fields: Mapping[str, Any], names: Sequence[str]) -> tuple[str, Any] | None:
    for n in names:
        v = fields.get(n)
        if v is not None:
            return n, v
    return None


def ocp_to_data(
    fields: Mapping[str, Any],
    source: str,
    dtype: torch.dtype | None = None,
    check_overlap: bool = False,
    keep_fields: Sequence[str] = (),
) -> Data:
    """One OCP record (fields of a fairchem ``Data``) as a contract ``Data``.

    Understood fields: ``atomic_numbers`` (or ``z``), ``pos``, ``cell``, ``pbc`` (default all
    True when a cell is given), ``natoms`` (checked), ``tags``, ``fixed``, ``energy`` or ``y``
    (S2EF energy), ``forces`` or ``force``, ``y_init``, ``y_relaxed``, ``pos_relaxed``,
    ``sid``, ``fid``. ``keep_fields`` are copied unchanged (e.g. ``edge_index``).

    Raises:
        StructureError: missing or inconsistent fields (the message names ``source``).
    """
    dtype = dtype or torch.get_default_dtype()
    zf = _first(fields, ("atomic_numbers", "z", "numbers"))
    if zf is None:
        raise StructureError(f"{source}: record has no 'atomic_numbers' (fields: {sorted(fields)})")
    if fields.get("pos") is None:
        raise StructureError(f"{source}: record has no 'pos' (fields: {sorted(fields)})")
    z_raw = _array(zf[1]).reshape(-1)
    z = np.rint(z_raw.astype(np.float64)).astype(np.int64)
    if not np.allclose(z, z_raw):
        raise StructureError(f"{source}: {zf[0]} are not whole numbers")
    n = len(z)
    pos = _array(fields["pos"]).astype(np.float64)
    if pos.shape != (n, 3):
        raise StructureError(f"{source}: pos has shape {tuple(pos.shape)}, expected ({n}, 3)")
    if fields.get("natoms") is not None and int(_scalar(fields["natoms"], "natoms", source)) != n:
        raise StructureError(f"{source}: natoms={int(_scalar(fields['natoms'], 'natoms', source))} but {n} atomic numbers")
    cell = None
    if fields.get("cell") is not None:
        cell = _array(fields["cell"]).astype(np.float64)
        if cell.size != 9:
            raise StructureError(f"{source}: cell has shape {tuple(cell.shape)}, expected (1, 3, 3)")
        cell = cell.reshape(3, 3)
    if fields.get("pbc") is not None:
        pbc = _array(fields["pbc"]).astype(bool).reshape(-1)
        if pbc.size == 1:
            pbc = np.repeat(pbc, 3)
    else:
        pbc = np.array(OC20_PBC if cell is not None else (False, False, False))

    extra: dict[str, Any] = {}
    tags = fields.get("tags")
    extra["tags"] = torch.zeros(n, dtype=torch.long) if tags is None else torch.as_tensor(_array(tags).astype(np.int64)).reshape(-1)
    fixed = fields.get("fixed")
    extra["fixed"] = torch.zeros(n, dtype=torch.bool) if fixed is None else torch.as_tensor(_array(fixed).reshape(-1) != 0)
    for name in ("tags", "fixed"):
        if extra[name].shape != (n,):
            raise StructureError(f"{source}: {name} has {extra[name].numel()} entries for {n} atoms")

    energy = None
    ef = _first(fields, ("energy", "y"))
    if ef is not None:
        energy = _scalar(ef[1], ef[0], source)
    forces = None
    ff = _first(fields, ("forces", "force"))
    if ff is not None:
        forces = _array(ff[1]).astype(np.float64)
        if forces.shape != (n, 3):
            raise StructureError(f"{source}: {ff[0]} has shape {tuple(forces.shape)}, expected ({n}, 3)")
    y = None
    for name in ("y_init", "y_relaxed"):
        if fields.get(name) is not None:
            extra[name] = torch.tensor([_scalar(fields[name], name, source)], dtype=dtype)
    if "y_relaxed" in extra:
        y = [float(extra["y_relaxed"][0])]
    if fields.get("pos_relaxed") is not None:
        pr = _array(fields["pos_relaxed"]).astype(np.float64)
        if pr.shape != (n, 3):
            raise StructureError(f"{source}: pos_relaxed has shape {tuple(pr.shape)}, expected ({n}, 3)")
        extra["pos_relaxed"] = torch.as_tensor(pr, dtype=dtype)
    for name in ("sid", "fid"):
        if fields.get(name) is not None:
            extra[name] = _ident(fields[name])
    for name in keep_fields:
        if name in fields:
            extra[name] = fields[name]
    data = make_data(z, pos, cell=cell, pbc=pbc, y=y, energy=energy, forces=forces, source=source,
                     check_overlap=check_overlap, dtype=dtype, **extra)
    del data.source  # the source names errors only; items stay free of per-item strings
    return data


class OC20LMDB(Dataset):
    """OC20 (S2EF or IS2RE/IS2RS) in the fairchem/OCP LMDB format.

    Args:
        path: an ``.lmdb`` file or a folder of shards (``data.0000.lmdb`` ...), e.g.
            ``<root>/s2ef/2M/train`` or ``<root>/is2re/all/val_id``.
        dtype: float dtype of positions, energies, forces.
        check_overlap: reject atoms closer than 0.1 Å (costs a neighbour search per item).
        keep_fields: further OCP fields copied unchanged (e.g. ``["edge_index", "cell_offsets"]``).

    Items carry ``idx`` (long [1], the index in this dataset) besides the fields of
    :func:`ocp_to_data`. Errors name the shard file and key.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        dtype: torch.dtype | None = None,
        check_overlap: bool = False,
        keep_fields: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.shards = LMDBShards(path)
        self.path = self.shards.path
        self.dtype = dtype or torch.get_default_dtype()
        self.check_overlap = bool(check_overlap)
        self.keep_fields = tuple(keep_fields)

    def __len__(self) -> int:
        return len(self.shards)

    def raw(self, i: int) -> dict[str, Any]:
        """The stored OCP fields of entry ``i`` (restricted unpickling), unconverted."""
        return ocp_fields(self.shards.get(i), self.shards.source(i))

    def __getitem__(self, i: int) -> Data:
        i = int(i)
        if i < 0:
            i += len(self)
        src = self.shards.source(i)
        data = ocp_to_data(self.raw(i), src, self.dtype, self.check_overlap, self.keep_fields)
        data.idx = torch.tensor([i])
        return data

    def __repr__(self) -> str:
        return f"OC20LMDB({self.path}, {len(self)} entries in {len(self.shards.files)} file(s))"


# ---------------------------------------------------------------------------------------------
# trajectories
# ---------------------------------------------------------------------------------------------


def default_trajectories_source() -> Path:
    """The shared ``oc20_relaxation_trajectories.tar.gz``.

    Looked up as ``$EQUIFORMER_SHARED_DATA/oc20/...``, else ``../shared/data/oc20/...``
    relative to the project checkout that holds this package (development installs).

    Raises:
        FileNotFoundError: neither exists (the message says where it looked).
    """
    tried = []
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        tried.append(Path(env).expanduser() / OC20_TRAJECTORIES_FILE)
    repo = Path(__file__).resolve().parents[1]
    tried.append(repo.parent / "shared" / "data" / OC20_TRAJECTORIES_FILE)
    for p in tried:
        if p.is_file():
            return p
    raise FileNotFoundError(
        "OC20 relaxation trajectories not found; looked for "
        + ", ".join(str(p) for p in tried)
        + f". Pass source=<.tar.gz, folder of .traj/.extxyz files, or file list> or set {SHARED_DATA_ENV}."
    )


def _is_traj(name: str) -> bool:
    return name.lower().endswith(TRAJECTORY_SUFFIXES)


def _traj_stem(name: str) -> str:
    base = Path(name).name
    for suf in TRAJECTORY_SUFFIXES:
        if base.lower().endswith(suf):
            return base[: -len(suf)]
    return Path(base).stem


def _safe_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    out = []
    for m in tar.getmembers():
        if not m.isfile() or not _is_traj(m.name):
            continue
        parts = Path(m.name).parts
        if Path(m.name).is_absolute() or ".." in parts:
            raise ValueError(f"{archive}: unsafe member path {m.name!r} in archive")
        out.append(m)
    return out


def _select(names: list[str], trajectories: int | Sequence[str] | None, where: str) -> list[str]:
    """Sorted trajectory names, cut to the first k or to the given names."""
    names = sorted(names, key=_traj_stem)
    if trajectories is None:
        return names
    if isinstance(trajectories, int):
        if trajectories < 1:
            raise ValueError(f"trajectories must be >= 1, got {trajectories}")
        return names[:trajectories]
    by_stem = {_traj_stem(n): n for n in names}
    missing = [t for t in trajectories if _traj_stem(t) not in by_stem]
    if missing:
        raise ValueError(f"{where}: no trajectory named {missing[0]!r} (have e.g. {list(by_stem)[:3]})")
    return [by_stem[_traj_stem(t)] for t in trajectories]


#: permutations tried by cover_elements before giving up
_COVER_ATTEMPTS = 64


def _greedy_cover_split(elements: list[set[int]], counts: Mapping[str, int],
                        order: list[int]) -> tuple[dict[str, list[int]] | None, tuple[str, int, int]]:
    """Fill the non-train splits in ``order`` with trajectories whose elements (and those of the ones
    already held out) stay present among the unassigned rest; ``train`` gets that rest.

    Returns ``(splits, _)`` or ``(None, (split name, wanted, found))`` when a split cannot be filled.
    """
    pool = list(order)
    needed: set[int] = set()
    out: dict[str, list[int]] = {name: [] for name in counts}
    for name, count in counts.items():
        if name == "train":
            continue
        for t in list(pool):
            if len(out[name]) == count:
                break
            rest = [u for u in pool if u != t]
            covered = set().union(*(elements[u] for u in rest)) if rest else set()
            if (needed | elements[t]) <= covered:
                out[name].append(t)
                pool.remove(t)
                needed |= elements[t]
        if len(out[name]) < count:
            return None, (name, count, len(out[name]))
    out["train"] = pool
    return out, ("", 0, 0)


class OC20Trajectories(Dataset):
    """S2EF-style frames of OC20 relaxation trajectories (ASE ``.traj`` or extxyz).

    Args:
        root: cache folder: the archive is extracted to ``root/raw`` and the processed frames
            are stored as ``root/oc20_trajectories_<key>.safetensors`` (default
            ``$EQUIFORMER_CACHE/oc20_trajectories`` or ``~/.cache/equiformer/oc20_trajectories``).
        source: a ``.tar.gz``/``.tar`` of trajectories, a folder of ``.traj``/``.extxyz``
            files, one file, or a list of files; default :func:`default_trajectories_source`.
        trajectories: use only the first ``k`` trajectories (sorted by name), or these names
            (e.g. ``["random1000100"]``); default all.
        frame_stride: keep every ``frame_stride``-th frame of each trajectory (0, s, 2s, ...).
        max_frames_per_trajectory: keep at most this many frames (after the stride) per trajectory.
        dtype: float dtype of positions, cell, energies, forces (stored in float64).

    Items: the fields of the module table plus ``traj_idx`` (long [1], index of the
    trajectory in :attr:`names`) and ``idx`` (long [1], index of the item in this dataset).
    ``sid`` is the integer of ``random<sid>`` file names (else the trajectory index) and
    ``fid`` the frame number in the full trajectory.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        trajectories: int | Sequence[str] | None = None,
        frame_stride: int = 1,
        max_frames_per_trajectory: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if int(frame_stride) < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
        if max_frames_per_trajectory is not None and int(max_frames_per_trajectory) < 1:
            raise ValueError(f"max_frames_per_trajectory must be >= 1, got {max_frames_per_trajectory}")
        self.root = Path(root).expanduser() if root is not None else default_cache_root("oc20_trajectories")
        self.dtype = dtype or torch.get_default_dtype()
        self.frame_stride = int(frame_stride)
        self.max_frames_per_trajectory = None if max_frames_per_trajectory is None else int(max_frames_per_trajectory)
        files, fingerprint = self._resolve_source(source, trajectories)
        key = cache_key(version=TRAJECTORIES_CACHE_VERSION, source=fingerprint)
        self.cache_path = cache_file(self.root, "oc20_trajectories", key)
        loaded = load_tensors(self.cache_path)
        if loaded is None:
            tensors = self._process(files)
            save_tensors(self.cache_path, tensors, meta={"source": fingerprint})
        else:
            tensors = loaded[0]
        self._set_tensors(tensors)

    # -- source handling ------------------------------------------------------------------------
    def _resolve_source(self, source: Any, trajectories: Any) -> tuple[list[Path], list[Any]]:
        """Trajectory files on disk (extracting an archive into ``root/raw``) and a fingerprint."""
        if source is None:
            source = default_trajectories_source()
        if isinstance(source, (list, tuple)):
            paths = [Path(s).expanduser() for s in source]
            for p in paths:
                if not p.is_file():
                    raise FileNotFoundError(f"{p}: no such trajectory file")
            paths = [Path(n) for n in _select([str(p) for p in paths], trajectories, "source list")]
            return paths, file_fingerprint(paths)
        src = Path(source).expanduser()
        if not src.exists():
            raise FileNotFoundError(f"{src}: no such trajectory archive, folder or file")
        if src.is_dir():
            names = [str(p) for p in src.iterdir() if p.is_file() and _is_traj(p.name)]
            if not names:
                raise FileNotFoundError(f"{src}: folder holds no {'/'.join(TRAJECTORY_SUFFIXES)} files")
            paths = [Path(n) for n in _select(names, trajectories, str(src))]
            return paths, file_fingerprint(paths)
        if _is_traj(src.name):
            return [src], file_fingerprint([src])
        if not tarfile.is_tarfile(src):
            raise ValueError(f"{src}: not a tar archive nor a {'/'.join(TRAJECTORY_SUFFIXES)} file")
        return self._extract(src, trajectories)

    def _extract(self, archive: Path, trajectories: Any) -> tuple[list[Path], list[Any]]:
        raw = self.root / "raw"
        try:
            with tarfile.open(archive) as tar:
                members = _safe_members(tar, archive)
                if not members:
                    raise ValueError(f"{archive}: archive holds no {'/'.join(TRAJECTORY_SUFFIXES)} files")
                chosen = set(_select([m.name for m in members], trajectories, str(archive)))
                members = sorted((m for m in members if m.name in chosen), key=lambda m: _traj_stem(m.name))
                paths = []
                for m in members:
                    dest = raw / m.name
                    if not dest.is_file() or dest.stat().st_size != m.size:
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        fobj = tar.extractfile(m)
                        assert fobj is not None
                        tmp = dest.with_name(dest.name + ".part")
                        with open(tmp, "wb") as out:
                            while chunk := fobj.read(1 << 20):
                                out.write(chunk)
                        os.replace(tmp, dest)
                    paths.append(dest)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ValueError(f"{archive}: cannot read archive ({type(exc).__name__}: {exc})") from None
        fingerprint = file_fingerprint([archive]) + [[m.name, int(m.size)] for m in members]
        return paths, fingerprint

    # -- processing -----------------------------------------------------------------------------
    @staticmethod
    def _process(files: list[Path]) -> dict[str, Tensor]:
        parts: dict[str, list[np.ndarray]] = {k: [] for k in
                                              ("z", "pos", "forces", "tags", "fixed", "cell", "pbc", "energy", "natoms")}
        traj_frames = []
        for f in files:
            fr = read_frames(f)
            if not np.isfinite(fr.energy).all():
                k = int(np.flatnonzero(~np.isfinite(fr.energy))[0])
                raise ValueError(f"{f}[frame {k}]: frame has no stored energy")
            if not np.isfinite(fr.forces).all():
                raise ValueError(f"{f}: a frame has no stored forces")
            start = 0
            ends = np.cumsum(fr.natoms)
            for k, end in enumerate(ends):
                sl = slice(start, int(end))
                # full checks on the first and last frame, cheap ones on every frame
                validate_structure(fr.z[sl], fr.pos[sl], fr.cell[k], fr.pbc[k], source=f"{f}[frame {k}]",
                                   check_overlap=k in (0, len(ends) - 1))
                start = int(end)
            for key in parts:
                parts[key].append(getattr(fr, key))
            traj_frames.append(fr.num_frames)
        names, name_ptr = strings_to_tensor([_traj_stem(f.name) for f in files])
        out = {k: torch.from_numpy(np.ascontiguousarray(np.concatenate(v))) for k, v in parts.items()}
        out["fixed"] = out["fixed"].to(torch.uint8)
        out["pbc"] = out["pbc"].to(torch.uint8)
        out["traj_frames"] = torch.tensor(traj_frames, dtype=torch.long)
        out["names"], out["name_ptr"] = names, name_ptr
        return out

    def _set_tensors(self, t: dict[str, Tensor]) -> None:
        self.names: list[str] = tensors_to_strings(t["names"], t["name_ptr"])
        self._z = t["z"].long()
        self._pos64 = t["pos"].double()
        self._forces64 = t["forces"].double()
        self._tags = t["tags"].long()
        self._fixed = t["fixed"].bool()
        self._cell64 = t["cell"].double()
        self._pbc = t["pbc"].bool()
        self._energy64 = t["energy"].double()
        natoms = t["natoms"].long()
        self._natoms = natoms
        self._atom_ptr = torch.zeros(len(natoms) + 1, dtype=torch.long)
        self._atom_ptr[1:] = torch.cumsum(natoms, 0)
        traj_frames = t["traj_frames"].long()
        self.traj_frame_ptr = torch.zeros(len(traj_frames) + 1, dtype=torch.long)
        self.traj_frame_ptr[1:] = torch.cumsum(traj_frames, 0)
        # the frames this dataset serves (stride / cap), in trajectory order
        frames, traj_of, fid = [], [], []
        for k in range(len(traj_frames)):
            a, b = int(self.traj_frame_ptr[k]), int(self.traj_frame_ptr[k + 1])
            local = list(range(0, b - a, self.frame_stride))
            if self.max_frames_per_trajectory is not None:
                local = local[: self.max_frames_per_trajectory]
            frames += [a + j for j in local]
            traj_of += [k] * len(local)
            fid += local
        self.frame_index = torch.tensor(frames, dtype=torch.long)  # item -> stored frame
        self.frame_traj = torch.tensor(traj_of, dtype=torch.long)  # item -> trajectory
        self.frame_fid = torch.tensor(fid, dtype=torch.long)  # item -> frame number in its trajectory
        self.sids = [int(m.group(1)) if (m := re.fullmatch(r"random(\d+)", n)) else k for k, n in enumerate(self.names)]
        # per-item lists for a fast __getitem__
        self._items = list(zip(self.frame_index.tolist(), self.frame_traj.tolist(), self.frame_fid.tolist()))
        self._atom_ptr_list = self._atom_ptr.tolist()

    # -- access ---------------------------------------------------------------------------------
    @property
    def num_trajectories(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return len(self._items)

    def _frame(self, f: int, traj: int, fid: int, idx: int) -> Data:
        a, b = self._atom_ptr_list[f], self._atom_ptr_list[f + 1]
        return Data(
            z=self._z[a:b].clone(),
            pos=self._pos64[a:b].to(self.dtype),
            cell=self._cell64[f : f + 1].to(self.dtype),
            pbc=self._pbc[f : f + 1].clone(),
            energy=self._energy64[f : f + 1].to(self.dtype),
            forces=self._forces64[a:b].to(self.dtype),
            tags=self._tags[a:b].clone(),
            fixed=self._fixed[a:b].clone(),
            sid=torch.tensor([self.sids[traj]]),
            fid=torch.tensor([fid]),
            traj_idx=torch.tensor([traj]),
            idx=torch.tensor([idx]),
        )

    def __getitem__(self, i: int) -> Data:
        i = resolve_index(i, len(self), "OC20Trajectories", "frames")
        f, traj, fid = self._items[i]
        return self._frame(f, traj, fid, i)

    def trajectory_items(self, traj: int) -> Tensor:
        """Item indices (in this dataset) of the frames of trajectory ``traj``."""
        return torch.nonzero(self.frame_traj == int(traj)).view(-1)

    def split(self, sizes: Mapping[str, SizeSpec] | None = None, seed: int = DEFAULT_SPLIT_SEED,
              cover_elements: bool = False) -> dict[str, Tensor]:
        """Item indices per split, split **by trajectory**.

        Args:
            sizes: trajectories per split, as counts or fractions (``None`` = the rest),
                default 80 % / 10 % / rest.
            seed: seed of the random permutation of trajectories.
            cover_elements: draw the non-train splits only from trajectories whose elements all
                occur in the training trajectories (an "in-domain" split like OC20's ``val_id``;
                with few systems a plain random split often puts an element in validation that
                training never saw, and no model can know its energy). ``"train"`` then takes
                every trajectory left over. Greedy over the seeded permutation of trajectories (and,
                if that cannot fill the splits, over up to 63 further permutations derived from the seed).

        Returns:
            ``{name: LongTensor of item indices}``; all frames of a trajectory are in one split.
        """
        traj_split = self.trajectory_split(sizes, seed, cover_elements)
        return {name: torch.cat([self.trajectory_items(t) for t in ts.tolist()]) if len(ts) else torch.zeros(0, dtype=torch.long)
                for name, ts in traj_split.items()}

    def trajectory_elements(self) -> list[set[int]]:
        """Atomic numbers present in each trajectory (from its first frame)."""
        out = []
        for k in range(self.num_trajectories):
            f = int(self.traj_frame_ptr[k])
            out.append(set(self._z[self._atom_ptr_list[f] : self._atom_ptr_list[f + 1]].tolist()))
        return out

    def trajectory_split(self, sizes: Mapping[str, SizeSpec] | None = None, seed: int = DEFAULT_SPLIT_SEED,
                         cover_elements: bool = False) -> dict[str, Tensor]:
        """``{name: LongTensor of trajectory indices}`` (see :meth:`split`)."""
        sizes = dict(TRAJECTORY_SPLIT_SIZES if sizes is None else sizes)
        n = self.num_trajectories
        counts = resolve_split_sizes(n, sizes)
        if n >= len(counts) and any(c == 0 for c in counts.values()):
            # fractions of few trajectories can round to 0: give every split one trajectory
            counts = {k: max(v, 1) for k, v in counts.items()}
            over = sum(counts.values()) - n
            big = max(counts, key=lambda k: counts[k])
            counts[big] -= max(over, 0)
        if not cover_elements:
            return random_split_indices(n, counts, seed)
        if "train" not in counts:
            raise ValueError(f"cover_elements needs a 'train' split, got {list(counts)}")
        elements = self.trajectory_elements()
        failed = ("", 0, 0)
        for attempt in range(_COVER_ATTEMPTS):  # greedy per permutation; the first that succeeds wins
            rng = np.random.default_rng(seed if attempt == 0 else [seed, attempt])
            out, failed = _greedy_cover_split(elements, counts, rng.permutation(n).tolist())
            if out is not None:
                return {name: torch.tensor(v, dtype=torch.long) for name, v in out.items()}
        name, count, found = failed
        raise ValueError(f"cannot hold out {count} trajectories for {name!r} whose elements all occur in the training "
                         f"trajectories (found {found}); use smaller splits or cover_elements=False")

    def energy_force_arrays(self, items: Tensor | Sequence[int] | None = None) -> dict[str, Tensor]:
        """Float64 labels of some items without building ``Data`` objects (for statistics).

        Returns:
            ``{"energy": [F], "natoms": [F], "z": [A], "forces": [A, 3], "fixed": [A], "tags": [A],
            "atom_item": [A] (position of each atom's item in ``items``)}``.
        """
        items = torch.arange(len(self)) if items is None else torch.as_tensor(items, dtype=torch.long)
        frames = self.frame_index[items]
        starts, ends = self._atom_ptr[frames], self._atom_ptr[frames + 1]
        natoms = ends - starts
        atom_item = torch.repeat_interleave(torch.arange(len(frames)), natoms)
        offs = torch.zeros(len(frames) + 1, dtype=torch.long)
        offs[1:] = torch.cumsum(natoms, 0)
        atoms = starts[atom_item] + torch.arange(int(offs[-1])) - offs[:-1][atom_item]
        return {"energy": self._energy64[frames], "natoms": natoms, "z": self._z[atoms], "forces": self._forces64[atoms],
                "fixed": self._fixed[atoms], "tags": self._tags[atoms], "atom_item": atom_item}

    def relaxation_pairs(self) -> OC20RelaxationPairs:
        """IS2RE-style view of the same trajectories (first frame -> relaxed energy)."""
        return OC20RelaxationPairs(self)

    def __repr__(self) -> str:
        return (f"OC20Trajectories({len(self)} frames of {self.num_trajectories} trajectories, "
                f"stride={self.frame_stride}, cache={self.cache_path})")


class OC20RelaxationPairs(Dataset):
    """IS2RE-style items from relaxation trajectories: one per trajectory.

    Item ``k``: the first frame of trajectory ``k`` (z, pos, cell, pbc, tags, fixed, its
    ``energy`` and ``forces``) with ``y_init`` [1] = its energy, ``y_relaxed`` [1] = the last
    frame's energy, ``y`` [1, 1] = ``y_relaxed`` and ``pos_relaxed`` [N, 3] = the last frame's
    positions (eV, Å). Built from an :class:`OC20Trajectories` (all its frames, whatever its
    stride) or with the same arguments.
    """

    def __init__(self, trajectories: OC20Trajectories | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.frames = trajectories if trajectories is not None else OC20Trajectories(**kwargs)
        self.dtype = self.frames.dtype

    @property
    def names(self) -> list[str]:
        return self.frames.names

    def __len__(self) -> int:
        return self.frames.num_trajectories

    def __getitem__(self, k: int) -> Data:
        k = resolve_index(k, len(self), "OC20RelaxationPairs", "trajectories")
        fr = self.frames
        first, last = int(fr.traj_frame_ptr[k]), int(fr.traj_frame_ptr[k + 1]) - 1
        data = fr._frame(first, k, 0, k)
        a, b = fr._atom_ptr_list[last], fr._atom_ptr_list[last + 1]
        if b - a != data.z.numel() or not torch.equal(fr._z[a:b], data.z):
            raise StructureError(f"trajectory {fr.names[k]}: last frame has other atoms than the first")
        e_relaxed = fr._energy64[last : last + 1].to(self.dtype)
        data.y_init = data.energy.clone()
        data.y_relaxed = e_relaxed
        data.y = e_relaxed.view(1, 1).clone()
        data.pos_relaxed = fr._pos64[a:b].to(self.dtype)
        return data

    def split(self, sizes: Mapping[str, SizeSpec] | None = None, seed: int = DEFAULT_SPLIT_SEED,
              cover_elements: bool = False) -> dict[str, Tensor]:
        """Same trajectories per split as :meth:`OC20Trajectories.split` with the same arguments."""
        return self.frames.trajectory_split(sizes, seed, cover_elements)

    def __repr__(self) -> str:
        return f"OC20RelaxationPairs({len(self)} trajectories)"
