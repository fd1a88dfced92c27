"""QM9: 130,831 small organic molecules (H, C, N, O, F; up to 29 atoms) with 12 DFT properties.

Source: the PyPI package ``qm9pack==1.0.3`` (``pip install "equiformer[qm9]"``), which ships
the QM9 data of Ramakrishnan et al., *Sci. Data* 1, 140022 (2014) as CSV files
(``qm9pack/data/qm9_part{1,2,3}.csv``): geometries (``XYZ_Ang``, Å, B3LYP/6-31G(2df,p)),
SMILES and all properties. It holds the 130,831 molecules that PyTorch Geometric's and
Equiformer's QM9 use: GDB-9 indices 1..133,885 in order with 3,054 absent, the count of the
"uncharacterized" molecules that PyG skips (matched by count and ordering; the list file
itself is not available offline to compare index by index).

Targets (same order, names and units as ``torch_geometric.datasets.QM9`` targets 0-11, and
the Equiformer paper):

===  =======  ============  ==========================================  ===========
 #   name     unit          meaning                                     reported in
===  =======  ============  ==========================================  ===========
 0   mu       D             dipole moment                               D
 1   alpha    a0^3          isotropic polarizability                    a0^3
 2   homo     eV            HOMO energy                                 meV
 3   lumo     eV            LUMO energy                                 meV
 4   gap      eV            LUMO - HOMO gap                             meV
 5   r2       a0^2          electronic spatial extent <R^2>             a0^2
 6   zpve     eV            zero-point vibrational energy               meV
 7   U0       eV            internal energy at 0 K (total)              meV
 8   U        eV            internal energy at 298.15 K (total)         meV
 9   H        eV            enthalpy at 298.15 K (total)                meV
10   G        eV            free energy at 298.15 K (total)             meV
11   Cv       cal/(mol K)   heat capacity at 298.15 K                   cal/(mol K)
===  =======  ============  ==========================================  ===========

Hartree is converted with ``HARTREE_TO_EV = 27.211386246`` (CODATA 2018, the constant PyG
uses). U0, U, H, G are *total* energies; :func:`qm9_atomref` gives the free-atom reference
energies of the QM9 paper (per element, eV) so that ``y - sum(atomref[z])`` is the
atomization energy (as PyG's ``atomref``; ZPVE and Cv have none, as in PyG, where they are zero).

Processing all molecules takes seconds; the result is cached (see :mod:`equiformer.datasets.cache`).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch_geometric.data import Data

from equiformer.data.contract import MIN_DISTANCE, StructureError, atomic_number
from equiformer.datasets.cache import (
    cache_file,
    cache_key,
    default_cache_root,
    file_fingerprint,
    load_tensors,
    save_tensors,
    strings_to_tensor,
    tensor_bytes,
    tensors_to_strings,
)
from equiformer.datasets.splits import DEFAULT_SPLIT_SEED, random_split_indices, resolve_index, scaled_split_sizes
from equiformer.datasets.targets import TargetInfo

#: Hartree in eV (CODATA 2018; identical to ``torch_geometric.datasets.qm9.HAR2EV``)
HARTREE_TO_EV = 27.211386246
#: bump when processing changes: it is part of the cache key, so old caches are rebuilt
QM9_CACHE_VERSION = 1
#: molecules in QM9 (qm9pack and PyG, uncharacterized ones excluded)
QM9_NUM_MOLECULES = 130_831
#: the standard random split sizes (Equiformer, TorchMD-NET, PaiNN, ...); ``None`` = the rest (10,831)
QM9_SPLIT_SIZES: dict[str, int | None] = {"train": 110_000, "val": 10_000, "test": None}
#: CSV files of qm9pack holding the molecules, in order
QM9_SOURCE_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
INSTALL_HINT = 'pip install "equiformer[qm9]"'

QM9_TARGETS: tuple[TargetInfo, ...] = (
    TargetInfo("mu", "D", "D", 1.0, "dipole moment"),
    TargetInfo("alpha", "a0^3", "a0^3", 1.0, "isotropic polarizability"),
    TargetInfo("homo", "eV", "meV", 1000.0, "energy of the highest occupied molecular orbital"),
    TargetInfo("lumo", "eV", "meV", 1000.0, "energy of the lowest unoccupied molecular orbital"),
    TargetInfo("gap", "eV", "meV", 1000.0, "HOMO-LUMO gap"),
    TargetInfo("r2", "a0^2", "a0^2", 1.0, "electronic spatial extent <R^2>"),
    TargetInfo("zpve", "eV", "meV", 1000.0, "zero-point vibrational energy"),
    TargetInfo("U0", "eV", "meV", 1000.0, "total internal energy at 0 K"),
    TargetInfo("U", "eV", "meV", 1000.0, "total internal energy at 298.15 K"),
    TargetInfo("H", "eV", "meV", 1000.0, "total enthalpy at 298.15 K"),
    TargetInfo("G", "eV", "meV", 1000.0, "total free energy at 298.15 K"),
    TargetInfo("Cv", "cal/(mol K)", "cal/(mol K)", 1.0, "heat capacity at 298.15 K"),
)
QM9_TARGET_NAMES: tuple[str, ...] = tuple(t.name for t in QM9_TARGETS)

# qm9pack column and factor giving each target in its unit, in QM9_TARGETS order
_COLUMNS: tuple[tuple[str, float], ...] = (
    ("Dipole_debye", 1.0),
    ("Polarizability_bohr3", 1.0),
    ("HOMO_au", HARTREE_TO_EV),
    ("LUMO_au", HARTREE_TO_EV),
    ("HOMO_LUMO_gap_au", HARTREE_TO_EV),
    ("R2_bohr2", 1.0),
    ("ZPVE_au", HARTREE_TO_EV),
    ("InternalEnergy_0K_au", HARTREE_TO_EV),
    ("InternalEnergy_298K_au", HARTREE_TO_EV),
    ("Enthalphy_298K_au", HARTREE_TO_EV),
    ("GibbsFreeEnergy_298K_au", HARTREE_TO_EV),
    ("Heatcapacity_Cv_cal_mol_K", 1.0),
)

_ALIASES: dict[str, str] = {
    **{t.name.lower(): t.name for t in QM9_TARGETS},
    "dipole": "mu",
    "dipole_moment": "mu",
    "polarizability": "alpha",
    "epsilon_homo": "homo",
    "epsilon_lumo": "lumo",
    "homo_lumo_gap": "gap",
    "delta_epsilon": "gap",
    "r^2": "r2",
    "u_0": "U0",
    "cv": "Cv",
    "c_v": "Cv",
    "heat_capacity": "Cv",
}

#: free-atom references of the QM9 paper (``atomref`` table, Hartree; Cv in cal/(mol K)):
#: element -> (ZPVE, U0, U, H, G, Cv)
QM9_FREE_ATOM_TABLE: dict[str, tuple[float, float, float, float, float, float]] = {
    "H": (0.0, -0.500273, -0.498857, -0.497912, -0.510927, 2.981),
    "C": (0.0, -37.846772, -37.845355, -37.844411, -37.861317, 2.981),
    "N": (0.0, -54.583861, -54.582445, -54.581501, -54.598897, 2.981),
    "O": (0.0, -75.064579, -75.063163, -75.062219, -75.079532, 2.981),
    "F": (0.0, -99.718730, -99.717314, -99.716370, -99.733544, 2.981),
}
# targets with an atomic reference (as PyG: U0, U, H, G; ZPVE's is zero and Cv's is not used)
_ATOMREF_COLUMN = {"U0": 1, "U": 2, "H": 3, "G": 4}


def qm9_target_info(name: str | int) -> TargetInfo:
    """Metadata of one target, by name (case-insensitive, aliases such as ``"HOMO"``, ``"u0"``,
    ``"dipole"``) or by index 0-11. Raises ``ValueError`` naming the valid targets."""
    return QM9_TARGETS[qm9_target_index(name)]


def qm9_target_index(name: str | int) -> int:
    """Column (0-11) of a target in QM9's ``y``."""
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        if 0 <= int(name) < len(QM9_TARGETS):
            return int(name)
        raise ValueError(f"QM9 target index {name} out of range 0..{len(QM9_TARGETS) - 1}")
    key = str(name).strip()
    canonical = _ALIASES.get(key.lower())
    if canonical is None:
        raise ValueError(f"unknown QM9 target {name!r}; choose from {', '.join(QM9_TARGET_NAMES)}")
    return QM9_TARGET_NAMES.index(canonical)


def resolve_qm9_targets(targets: str | int | Sequence[str | int] | None) -> list[str]:
    """Canonical target names; ``None`` = all 12; a string may list several: ``"homo,lumo"``."""
    if targets is None:
        return list(QM9_TARGET_NAMES)
    if isinstance(targets, str):
        targets = [t for t in targets.replace(" ", ",").split(",") if t]
    elif isinstance(targets, (int, np.integer)):
        targets = [targets]
    names = [QM9_TARGET_NAMES[qm9_target_index(t)] for t in targets]
    if not names:
        raise ValueError("no QM9 target selected")
    if len(set(names)) != len(names):
        raise ValueError(f"QM9 targets listed twice: {names}")
    return names


def qm9_atomref(target: str | int, max_z: int = 118) -> Tensor | None:
    """Free-atom reference energy per element for ``target``, in the target's unit (eV).

    Returns:
        float64 tensor [max_z + 1] indexed by atomic number (zeros for elements absent from
        QM9), for U0, U, H and G; ``None`` for the other targets (PyG's ``atomref`` is zero
        for ZPVE and Cv and absent for the rest). ``y - atomref[z].sum()`` is the atomization
        energy, e.g. -17.17 eV for methane's U0.
    """
    name = qm9_target_info(target).name
    col = _ATOMREF_COLUMN.get(name)
    if col is None:
        return None
    out = torch.zeros(max_z + 1, dtype=torch.float64)
    for symbol, row in QM9_FREE_ATOM_TABLE.items():
        out[atomic_number(symbol)] = row[col] * HARTREE_TO_EV
    return out


def qm9_split(n: int = QM9_NUM_MOLECULES, seed: int = DEFAULT_SPLIT_SEED) -> dict[str, Tensor]:
    """The standard QM9 random split: 110,000 train / 10,000 val / rest test.

    ``numpy.random.default_rng(seed).permutation(n)`` cut in that order; ``seed=1`` is the
    protocol of the Equiformer repository's QM9 loader (``torchmd_net_split``, following
    TorchMD-NET). Index ``i`` is the ``i``-th molecule of :class:`QM9` (GDB-9 order without
    the uncharacterized molecules), the same ordering as PyG's QM9, so the index sets should
    coincide with Equiformer's; equality with TorchMD-NET's saved ``splits.npz`` files is not
    claimed (not verified here: those files are not available offline).
    """
    return random_split_indices(n, QM9_SPLIT_SIZES, seed)


def qm9_source_dir() -> Path:
    """Folder holding qm9pack's CSV files; ``FileNotFoundError`` with the install hint if absent."""
    spec = importlib.util.find_spec("qm9pack")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"QM9 needs the PyPI package qm9pack (the QM9 data), which is not installed: {INSTALL_HINT}"
        )
    return Path(locations[0]) / "data"


def _source_paths(source_dir: Path) -> list[Path]:
    paths = [source_dir / f for f in QM9_SOURCE_FILES]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"QM9 source file {p} not found (reinstall qm9pack: {INSTALL_HINT})")
    return paths


def _processed_without_source(root: Path, stem: str) -> tuple[Path, dict[str, Tensor]] | None:
    """The newest ``<root>/<stem>_*.safetensors`` written by this code version, if any."""
    for path in sorted(Path(root).glob(f"{stem}_*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True):
        loaded = load_tensors(path)
        if loaded is not None and loaded[1].get("version") == QM9_CACHE_VERSION:
            return path, loaded[0]
    return None


def export_compact_qm9(dataset: "QM9", path: str | Path) -> Path:
    """Write ``dataset``'s processed tables with float32 positions (about 45 MB for all of QM9).

    For moving QM9 to a machine without qm9pack: put the file in that machine's QM9 ``root``
    (named ``qm9_all_<anything>.safetensors``) and :class:`QM9` loads it. Positions in float32
    are exact for float32 training; targets stay float64.
    """
    loaded = load_tensors(dataset.cache_path)
    if loaded is None:
        raise FileNotFoundError(f"no processed QM9 file at {dataset.cache_path}")
    tensors, meta = loaded
    tensors = dict(tensors, pos=tensors["pos"].float())
    return save_tensors(path, tensors, dict(meta, compact=True))


# ----------------------------------------------------------------------------- processing

_USECOLS = ["XYZ_file", "Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang"] + [c for c, _ in _COLUMNS]
_CHUNK = 8192


def _read_tables(paths: list[Path], subset: int | None):
    import pandas as pd

    frames = []
    left = subset
    for p in paths:
        if left is not None and left <= 0:
            break
        try:
            df = pd.read_csv(
                p, usecols=_USECOLS, nrows=left, dtype={"XYZ_Ang": str, "Elements": str, "SMILES": str, "XYZ_file": str}
            )
        except ValueError as exc:  # missing columns, unparsable numbers
            raise StructureError(f"{p}: not a qm9pack QM9 table ({exc})") from exc
        df["_file"] = p.name
        df["_row"] = np.arange(len(df))
        frames.append(df)
        if left is not None:
            left -= len(df)
    df = pd.concat(frames, ignore_index=True)
    if subset is not None and len(df) < subset:
        raise ValueError(f"QM9 subset={subset} asked for, but the source holds only {len(df)} molecules")
    return df


def _where(df, i: int) -> str:
    return f"{df['_file'].iat[i]} row {int(df['_row'].iat[i]) + 2} ({df['XYZ_file'].iat[i]})"


def _strip_join(values) -> str:
    return ",".join(values).replace("[", "").replace("]", "").replace("'", "").replace('"', "").replace(" ", "")


def _min_distances(pos: np.ndarray, ptr: np.ndarray) -> np.ndarray:
    """Smallest interatomic distance of each molecule (inf for one atom); pos [A,3], ptr [m+1]."""
    counts = np.diff(ptr)
    m, nmax = len(counts), int(counts.max())
    batch = np.repeat(np.arange(m), counts)
    local = np.arange(len(pos)) - ptr[:-1][batch]
    padded = np.zeros((m, nmax, 3))
    padded[:, :, 0] = 1e6 * (np.arange(nmax) + 1)  # padding atoms far from everything
    padded[batch, local] = pos
    p = torch.from_numpy(padded)
    d = torch.cdist(p, p)
    d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    return d.amin(dim=(1, 2)).numpy()


def process_qm9(source_dir: Path | None = None, subset: int | None = None, progress: bool = True) -> dict[str, Tensor]:
    """Parse and validate qm9pack's CSVs into flat tensors.

    Returns:
        ``z`` uint8 [A]; ``pos`` float64 [A,3] Å; ``ptr`` long [M+1] (atoms of molecule i are
        ``ptr[i]:ptr[i+1]``); ``y`` float64 [M,12] in the units of :data:`QM9_TARGETS`;
        ``gdb_index`` long [M] (QM9's 1-based id, ``gdb_<id>``); ``smiles``/``smiles_ptr``
        (UTF-8 bytes and offsets).

    Raises:
        StructureError: a row that breaks the data contract, naming file, line and molecule.
    """
    from tqdm.auto import tqdm

    source_dir = Path(source_dir) if source_dir is not None else qm9_source_dir()
    df = _read_tables(_source_paths(source_dir), subset)
    m = len(df)
    n_atoms = df["N_atoms"].to_numpy(dtype=np.int64)
    bad = np.flatnonzero(n_atoms < 1)
    if len(bad):
        raise StructureError(f"{_where(df, int(bad[0]))}: empty molecule (N_atoms={n_atoms[bad[0]]})")
    ptr = np.zeros(m + 1, dtype=np.int64)
    ptr[1:] = np.cumsum(n_atoms)
    z = np.empty(ptr[-1], dtype=np.uint8)
    pos = np.empty((ptr[-1], 3), dtype=np.float64)
    symbol_z: dict[str, int] = {}

    bar = tqdm(total=m, desc="QM9: processing molecules", unit="mol", disable=not progress, mininterval=0.5)
    for lo in range(0, m, _CHUNK):
        hi = min(lo + _CHUNK, m)
        xyz = df["XYZ_Ang"].iloc[lo:hi]
        elements = df["Elements"].iloc[lo:hi]
        n_coord = xyz.str.count(",").to_numpy() + 1
        n_elem = elements.str.count(",").to_numpy() + 1
        wrong = np.flatnonzero((n_coord != 3 * n_atoms[lo:hi]) | (n_elem != n_atoms[lo:hi]))
        if len(wrong):
            i = lo + int(wrong[0])
            raise StructureError(
                f"{_where(df, i)}: N_atoms={n_atoms[i]} but {n_elem[wrong[0]]} elements and "
                f"{n_coord[wrong[0]]} coordinates (expected {3 * n_atoms[i]})"
            )
        a, b = ptr[lo], ptr[hi]
        try:
            pos[a:b] = np.asarray(_strip_join(xyz.tolist()).split(","), dtype=np.float64).reshape(-1, 3)
        except ValueError:
            for k in range(lo, hi):
                try:
                    np.asarray(_strip_join([df["XYZ_Ang"].iat[k]]).split(","), dtype=np.float64)
                except ValueError as exc:
                    raise StructureError(f"{_where(df, k)}: unreadable coordinates ({exc})") from None
            raise
        symbols = np.asarray(_strip_join(elements.tolist()).split(","))
        uniq, inverse = np.unique(symbols, return_inverse=True)
        for s in uniq.tolist():
            if s not in symbol_z:
                k = lo + int(np.searchsorted(ptr[lo + 1 : hi + 1] - a, int(np.flatnonzero(symbols == s)[0]), side="right"))
                symbol_z[str(s)] = atomic_number(str(s), source=_where(df, k))
        z[a:b] = np.asarray([symbol_z[s] for s in uniq.tolist()], dtype=np.uint8)[inverse]
        chunk_pos = pos[a:b]
        if not np.isfinite(chunk_pos).all():
            atom = int(np.flatnonzero(~np.isfinite(chunk_pos).all(axis=1))[0]) + a
            k = int(np.searchsorted(ptr, atom, side="right")) - 1
            raise StructureError(f"{_where(df, k)}: atom {atom - ptr[k]} has non-finite coordinates")
        dmin = _min_distances(chunk_pos, ptr[lo : hi + 1] - a)
        close = np.flatnonzero(dmin < MIN_DISTANCE)
        if len(close):
            k = lo + int(close[0])
            raise StructureError(f"{_where(df, k)}: atoms closer than {MIN_DISTANCE} Å ({dmin[close[0]]:.3g} Å)")
        bar.update(hi - lo)
    bar.close()

    y = np.stack([df[col].to_numpy(dtype=np.float64) * factor for col, factor in _COLUMNS], axis=1)
    if not np.isfinite(y).all():
        i, j = (int(v) for v in np.argwhere(~np.isfinite(y))[0])
        raise StructureError(f"{_where(df, i)}: property {_COLUMNS[j][0]} is not a finite number")
    smiles, smiles_ptr = strings_to_tensor(df["SMILES"].astype(str).tolist())
    return {
        "z": torch.from_numpy(z),
        "pos": torch.from_numpy(pos),
        "ptr": torch.from_numpy(ptr),
        "y": torch.from_numpy(y),
        "gdb_index": torch.from_numpy(np.array(df["Index"].to_numpy(dtype=np.int64))),
        "smiles": smiles,
        "smiles_ptr": smiles_ptr,
    }


# ----------------------------------------------------------------------------- dataset


class QM9(Dataset):
    """QM9 as a map-style dataset of contract ``Data`` objects.

    ``dataset[i]`` is a ``torch_geometric.data.Data`` with ``z`` [N] long, ``pos`` [N,3] Å,
    ``cell`` zeros [1,3,3], ``pbc`` False [1,3], ``y`` [1,T] (the selected targets in their
    units, see :data:`QM9_TARGETS`), ``idx`` [1] long (``i``: the row in this dataset, which
    for the full set is the index the standard split uses; PyG's ``idx`` is instead the GDB-9
    id minus one), ``name`` (``"gdb_<id>"``, as PyG) and ``smiles``.

    Args:
        root: cache folder; default ``$EQUIFORMER_CACHE/qm9`` or ``~/.cache/equiformer/qm9``.
        subset: keep only the first ``subset`` molecules (real rows, for tests and quick runs).
        targets: targets in ``y`` (names/aliases/indices); default all 12.
        subtract_atomref: ``y`` minus the summed free-atom references (:func:`qm9_atomref`)
            for U0/U/H/G, i.e. atomization energies; computed in float64 before the cast to
            ``dtype`` (totals of ~-10,000 eV in float32 are only resolved to ~1 meV).
        dtype: floating dtype of ``pos``/``cell``/``y``; default ``torch.get_default_dtype()``.
        force_reload: reprocess even if a valid cache exists.
        progress: show a progress bar while processing.
        source_dir: folder with ``qm9_part{1,2,3}.csv``; default qm9pack's ``data`` folder.
    """

    TARGETS = QM9_TARGETS
    TARGET_NAMES = QM9_TARGET_NAMES

    def __init__(
        self,
        root: str | Path | None = None,
        subset: int | None = None,
        targets: str | Sequence[str | int] | None = None,
        subtract_atomref: bool = False,
        dtype: torch.dtype | None = None,
        force_reload: bool = False,
        progress: bool = True,
        source_dir: str | Path | None = None,
    ) -> None:
        if subset is not None and not (1 <= int(subset) <= QM9_NUM_MOLECULES):
            raise ValueError(f"QM9 subset must be in 1..{QM9_NUM_MOLECULES}, got {subset}")
        self.subset = None if subset is None else int(subset)
        self.root = Path(root).expanduser() if root is not None else default_cache_root("qm9")
        self.target_names = resolve_qm9_targets(targets)
        self.target_columns = [QM9_TARGET_NAMES.index(t) for t in self.target_names]
        self.subtract_atomref = bool(subtract_atomref)
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()

        stem = "qm9_all" if self.subset is None else f"qm9_first{self.subset}"
        t0 = time.perf_counter()
        try:
            self.source_dir = Path(source_dir) if source_dir is not None else qm9_source_dir()
            paths = _source_paths(self.source_dir)
        except FileNotFoundError:
            # No raw source (e.g. a GPU node without qm9pack): a processed file of this code
            # version in ``root`` is enough; otherwise the install hint is raised.
            found = None if force_reload else _processed_without_source(self.root, stem)
            if found is None:
                raise
            self.source_dir = None
            self.cache_path, tensors = found
            key = None
        else:
            key = cache_key(version=QM9_CACHE_VERSION, files=file_fingerprint(paths), subset=self.subset)
            self.cache_path = cache_file(self.root, stem, key)
        loaded = None if force_reload or key is None else load_tensors(self.cache_path)
        if key is None:
            self.cache_hit = True
        elif loaded is not None and loaded[1].get("key") == key:
            tensors = loaded[0]
            self.cache_hit = True
        else:
            tensors = process_qm9(self.source_dir, self.subset, progress=progress)
            meta = {"key": key, "version": QM9_CACHE_VERSION, "subset": self.subset, "targets": list(QM9_TARGET_NAMES)}
            save_tensors(self.cache_path, tensors, meta)
            self.cache_hit = False
        self.load_seconds = time.perf_counter() - t0
        self.cache_bytes = tensor_bytes(tensors)

        self.ptr: Tensor = tensors["ptr"]
        self.z: Tensor = tensors["z"].long()
        self.pos_table: Tensor = tensors["pos"].double()  # float64, Å (a compact export stores float32)
        self.y_table: Tensor = tensors["y"]  # float64 [M,12], totals, QM9_TARGETS units
        self.gdb_index: Tensor = tensors["gdb_index"]
        # plain Python lists: per-item lookups in __getitem__ cost ~0.03 us instead of ~4 us
        self._ptr_list: list[int] = self.ptr.tolist()
        self._names = [f"gdb_{g}" for g in self.gdb_index.tolist()]
        self._smiles = tensors_to_strings(tensors["smiles"], tensors["smiles_ptr"])
        self._pos = self.pos_table.to(self.dtype)
        y = self.y_table[:, self.target_columns]
        if self.subtract_atomref:
            y = y - self.atomref_sums(self.target_names)
        self._y = y.to(self.dtype)

    # -- sizes and tables ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ptr) - 1

    @property
    def num_atoms(self) -> Tensor:
        """[M] long: atoms per molecule."""
        return self.ptr[1:] - self.ptr[:-1]

    @property
    def y(self) -> Tensor:
        """[M,T] the ``y`` of every molecule (selected targets, ``dtype``)."""
        return self._y

    def atomref_sums(self, targets: str | Sequence[str | int] | None = None) -> Tensor:
        """[M,T] float64: summed free-atom references of each molecule (zeros where a target has none)."""
        names = resolve_qm9_targets(targets) if targets is not None else self.target_names
        table = qm9_atomrefs(names)  # [T,119]
        batch = torch.repeat_interleave(torch.arange(len(self)), self.num_atoms)
        out = torch.zeros(len(self), len(names), dtype=torch.float64)
        out.index_add_(0, batch, table[:, self.z].T)
        return out

    def atomrefs(self) -> Tensor:
        """[T,119] float64 free-atom references of the selected targets (zeros where none)."""
        return qm9_atomrefs(self.target_names)

    @staticmethod
    def atomref(target: str | int) -> Tensor | None:
        """See :func:`qm9_atomref`: [119] float64 (eV) for U0/U/H/G, else ``None``."""
        return qm9_atomref(target)

    @staticmethod
    def target_info(target: str | int) -> TargetInfo:
        """See :func:`qm9_target_info`."""
        return qm9_target_info(target)

    @property
    def target_infos(self) -> list[TargetInfo]:
        return [qm9_target_info(t) for t in self.target_names]

    def name(self, i: int) -> str:
        """``"gdb_<id>"`` of molecule ``i`` (QM9's 1-based id, as PyG names it)."""
        return self._names[i]

    def smiles(self, i: int) -> str:
        return self._smiles[i]

    # -- items -----------------------------------------------------------------------------
    def __getitem__(self, i: int) -> Data:
        i = resolve_index(i, len(self), "QM9", "molecules")
        a, b = self._ptr_list[i], self._ptr_list[i + 1]
        # clones, not views: a saved or pickled item must not drag the whole table along
        return Data(
            z=self.z[a:b].clone(),
            pos=self._pos[a:b].clone(),
            cell=torch.zeros(1, 3, 3, dtype=self.dtype),
            pbc=torch.zeros(1, 3, dtype=torch.bool),
            y=self._y[i : i + 1].clone(),
            idx=torch.tensor([i]),
            name=self._names[i],
            smiles=self._smiles[i],
        )

    def split(self, seed: int = DEFAULT_SPLIT_SEED) -> dict[str, Tensor]:
        """Standard split (:func:`qm9_split`); a subset gets sizes scaled down proportionally
        (:func:`~equiformer.datasets.splits.scaled_split_sizes`, e.g. 840/76/84 of 1,000)."""
        if self.subset is None:
            return qm9_split(len(self), seed)
        sizes = scaled_split_sizes(len(self), QM9_NUM_MOLECULES, QM9_SPLIT_SIZES)
        return random_split_indices(len(self), sizes, seed)

    def __repr__(self) -> str:
        return f"QM9({len(self)} molecules, targets={self.target_names}, cache={self.cache_path})"


def qm9_atomrefs(targets: str | Sequence[str | int] | None = None, max_z: int = 118) -> Tensor:
    """[T, max_z+1] float64 free-atom references of ``targets`` (rows of zeros where none)."""
    names = resolve_qm9_targets(targets)
    out = torch.zeros(len(names), max_z + 1, dtype=torch.float64)
    for k, t in enumerate(names):
        ref = qm9_atomref(t, max_z)
        if ref is not None:
            out[k] = ref
    return out
