"""Read structure files into the data contract: :func:`read`.

Formats (by extension, by name for ``POSCAR*``/``CONTCAR*``, or ``format=``):

==========  ==========================================  =================================
format      files                                       reader
==========  ==========================================  =================================
xyz         ``.xyz`` (plain or extended XYZ)            own parser, line-numbered errors
extxyz      ``.extxyz``                                 own parser
sdf / mol   ``.sdf``, ``.sd``, ``.mol``                 RDKit, one record at a time
cif         ``.cif``                                    pymatgen (ordered structures only)
poscar      ``POSCAR*``, ``CONTCAR*``, ``.vasp``,       own parser
            ``.poscar``
pdb         ``.pdb``, ``.ent``                          own parser (molecule, no cell)
json        ``.json``: pymatgen Structure/Molecule      pymatgen
            dict, a list of them, or entries with
            a ``"structure"``
traj        ``.traj`` (ASE trajectory)                  ASE
ase:FMT     anything ASE reads, e.g. ``ase:vasp-out``   ASE (errors less precise)
==========  ==========================================  =================================

Text formats may be gzip-compressed (``water.xyz.gz``). Every problem raises one
``StructureError`` (a ``ValueError``) naming the file and, where possible, the line or
record; a missing file raises ``FileNotFoundError``.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch_geometric.data import Data

from equiformer.data.contract import StructureError
from equiformer.data.records import Record, structure_source, to_data

EXTENSIONS: dict[str, str] = {
    ".xyz": "xyz",
    ".extxyz": "extxyz",
    ".sdf": "sdf",
    ".sd": "sdf",
    ".mol": "mol",
    ".cif": "cif",
    ".vasp": "poscar",
    ".poscar": "poscar",
    ".pdb": "pdb",
    ".ent": "pdb",
    ".json": "json",
    ".traj": "traj",
}
_ALIASES = {"vasp": "poscar", "contcar": "poscar", "pymatgen": "json", "sd": "sdf", "ent": "pdb"}
FORMATS: tuple[str, ...] = ("xyz", "extxyz", "sdf", "mol", "cif", "poscar", "pdb", "json", "traj")
_BINARY = {"traj"}


def supported() -> str:
    """Human-readable list of supported formats for error messages."""
    exts = ", ".join(sorted(EXTENSIONS))
    return f"{exts}, POSCAR/CONTCAR, or format='ase:<ase format>'"


def guess_format(path: str | os.PathLike) -> str:
    """Format name of a file from its name (``.gz`` is looked through).

    Raises:
        StructureError: ``x.foo: unsupported file format '.foo' (supported: ...)``.
    """
    name = Path(path).name
    base = name[:-3] if name.lower().endswith(".gz") else name
    upper = base.upper()
    if upper.startswith(("POSCAR", "CONTCAR")):
        return "poscar"
    suffix = Path(base).suffix.lower()
    if suffix in EXTENSIONS:
        return EXTENSIONS[suffix]
    what = f"'{suffix}'" if suffix else "(no extension)"
    raise StructureError(f"{path}: unsupported file format {what} (supported: {supported()})")


def read(
    path: str | os.PathLike,
    format: str | None = None,
    *,
    check_overlap: bool = True,
    sanitize: bool = True,
    energy_key: str = "energy",
    forces_key: str = "forces",
    dtype: torch.dtype | None = None,
) -> list[Data]:
    """Read every structure of a file into contract ``Data`` objects.

    Args:
        path: the file.
        format: one of :data:`FORMATS` (or ``"ase:<format>"``); default: from the file name.
        check_overlap: reject atoms closer than 0.1 Å.
        sanitize: SDF/MOL: reject molecules RDKit cannot sanitise (valence errors, ...).
        energy_key: extended XYZ: comment key of the energy (eV), e.g. ``"REF_energy"``.
        forces_key: extended XYZ: per-atom property of the forces (eV/Å), e.g. ``"REF_forces"``.
        dtype: float dtype of positions, cells, energies, forces (default torch's).

    Returns:
        One ``Data`` per structure, each with ``source`` (``"file"`` for a one-structure
        file, ``"file[i]"`` otherwise), ``index`` (position in the file, from 0) and ``name``
        (title line, SDF title, ... or ""); SDF molecules also carry ``smiles``.

    Raises:
        FileNotFoundError: the file does not exist.
        StructureError: unsupported format, malformed file, or an invalid structure; the
            message names the file and the problem.
    """
    p = Path(path)
    shown = str(path)
    if not p.exists():
        raise FileNotFoundError(f"{shown}: no such file")
    if p.is_dir():
        raise StructureError(f"{shown}: is a directory, not a structure file")
    fmt = _normalise(format, shown) if format else guess_format(shown)
    if fmt.startswith("ase:"):
        records = _read_ase(p, shown, fmt[4:] or None)
    elif fmt in _BINARY:
        records = _read_ase(p, shown, fmt)
    else:
        text = _read_text(p, shown, fmt)
        reader = _TEXT_READERS[fmt]
        records = reader(text, shown, sanitize=sanitize, energy_key=energy_key, forces_key=forces_key)
    n = len(records)
    return [
        to_data(rec, structure_source(shown, i, n), index=i, check_overlap=check_overlap, dtype=dtype)
        for i, rec in enumerate(records)
    ]


def _normalise(format: str, shown: str) -> str:
    f = format.strip()
    if f.lower().startswith("ase:"):
        return "ase:" + f[4:]
    f = f.lower().lstrip(".")
    f = _ALIASES.get(f, f)
    if f not in FORMATS:
        raise StructureError(f"{shown}: unsupported format {format!r} (supported: {', '.join(FORMATS)}, ase:<format>)")
    return f


def _read_text(p: Path, shown: str, fmt: str) -> str:
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise StructureError(f"{shown}: cannot read the file ({exc.strerror or exc})") from None
    if p.name.lower().endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise StructureError(f"{shown}: not a valid gzip file ({exc})") from None
    if not raw.strip():
        raise StructureError(f"{shown}: file is empty")
    if b"\x00" in raw[:4096]:
        raise StructureError(f"{shown}: binary data, not a text file (expected {fmt})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# ------------------------------------------------------------------------------ readers


def _xyz(text: str, shown: str, energy_key: str = "energy", forces_key: str = "forces", **_: Any) -> list[Record]:
    from equiformer.data.xyz import parse_xyz

    return parse_xyz(text, shown, energy_key=energy_key, forces_key=forces_key)


def _poscar(text: str, shown: str, **_: Any) -> list[Record]:
    from equiformer.data.poscar import parse_poscar

    return parse_poscar(text, shown)


def _pdb(text: str, shown: str, **_: Any) -> list[Record]:
    from equiformer.data.pdb import parse_pdb

    return parse_pdb(text, shown)


def _split_sdf(text: str) -> list[tuple[int, str]]:
    """Records of an SD file as (1-based first line, text); blank trailing records dropped."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 1
    for ln, line in enumerate(text.splitlines(), start=1):
        if line.startswith("$$$$"):
            out.append((start, "\n".join(buf)))
            buf, start = [], ln + 1
        else:
            buf.append(line)
    if any(line.strip() for line in buf):
        out.append((start, "\n".join(buf)))
    return out


def _sdf(text: str, shown: str, sanitize: bool = True, **_: Any) -> list[Record]:
    from rdkit import Chem

    from equiformer.data.convert import _rdkit_log, rdkit_reason, rdkit_record

    blocks = _split_sdf(text)
    if not blocks:
        raise StructureError(f"{shown}: no molecule records")
    records = []
    for i, (start, block) in enumerate(blocks):
        where = f"{structure_source(shown, i, len(blocks))} (record starting at line {start})"
        supplier = Chem.SDMolSupplier()
        with _rdkit_log() as log:
            supplier.SetData(block + "\n$$$$\n", sanitize=False, removeHs=False)
            mol = supplier[0] if len(supplier) else None
        if mol is None:
            reason = rdkit_reason(log, "RDKit cannot parse this molfile block")
            # RDKit counts lines within the record; give the line of the file
            reason = re.sub(r"on line (\d+)", lambda m: f"on line {start + int(m.group(1)) - 1}", reason)
            raise StructureError(f"{where}: cannot read the molecule: {reason}")
        if sanitize:
            with _rdkit_log() as log:
                try:
                    Chem.SanitizeMol(mol)
                    problem = None
                except Exception as exc:  # noqa: BLE001 - RDKit raises several sanitisation errors
                    problem = str(exc).strip() or type(exc).__name__
            if problem:
                raise StructureError(
                    f"{where}: RDKit cannot sanitise the molecule: {problem} (read it with sanitize=False to keep it)"
                )
        rec = rdkit_record(mol, where)
        rec.where = f"record starting at line {start}"
        records.append(rec)
    return records


_CELL_KEYS = (
    "_cell_length_a",
    "_cell_length_b",
    "_cell_length_c",
    "_cell_angle_alpha",
    "_cell_angle_beta",
    "_cell_angle_gamma",
)
_SITE_KEYS = ("_atom_site_fract_x", "_atom_site_cartn_x", "_atom_site_label", "_atom_site_type_symbol")


def _cif_number(value: Any) -> float | None:
    if isinstance(value, list):
        value = value[0] if value else ""
    text = str(value).strip().split("(")[0]
    try:
        return float(text)
    except ValueError:
        return None


def _split_cif(text: str) -> list[tuple[int, str]]:
    """``data_`` blocks of a CIF as (1-based first line, text), skipping ``;`` text fields.

    Split by hand because pymatgen keys blocks by name, so two blocks named alike would merge."""
    blocks: list[tuple[int, list[str]]] = []
    in_text = False
    for ln, line in enumerate(text.splitlines(), start=1):
        if line.startswith(";"):
            in_text = not in_text
        if not in_text and line.lstrip().lower().startswith("data_"):
            blocks.append((ln, [line.strip()]))
        elif blocks:
            blocks[-1][1].append(line)
    return [(ln, "\n".join(lines) + "\n") for ln, lines in blocks]


def _cif(text: str, shown: str, **_: Any) -> list[Record]:
    from pymatgen.io.cif import CifFile, CifParser

    from equiformer.data.convert import pymatgen_record

    blocks = []
    for start, block_text in _split_cif(text):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                (name, block), *_rest = CifFile.from_str(block_text).data.items()
            except Exception as exc:  # noqa: BLE001 - pymatgen raises assorted errors on bad CIF
                raise StructureError(f"{shown} line {start}: cannot read this data block ({_brief(exc)})") from None
        label = f"data block '{name}' (line {start})"
        keys = {k.lower(): k for k in block.data}
        has_sites = any(k in keys for k in _SITE_KEYS)
        missing = [k for k in _CELL_KEYS if k not in keys]
        if not has_sites and missing:
            continue  # a block without a structure (e.g. global metadata)
        if not has_sites:
            raise StructureError(f"{shown}: {label} has a cell but no atom sites (_atom_site_fract_x, ...)")
        if missing:
            raise StructureError(f"{shown}: {label} has no unit cell (missing {', '.join(missing)})")
        for k in _CELL_KEYS:
            value = _cif_number(block.data[keys[k]])
            if value is None or value <= 0:
                raise StructureError(f"{shown}: {label}: {k} is {block.data[keys[k]]!r}, not a positive number")
        if "_atom_site_fract_x" not in keys:
            raise StructureError(
                f"{shown}: {label} gives no fractional coordinates (_atom_site_fract_x/y/z); "
                "Cartesian-only CIFs are not supported"
            )
        blocks.append((label, block_text))
    if not blocks:
        raise StructureError(f"{shown}: no crystal structure (no data block with _cell_length_* and _atom_site_*)")
    records = []
    for i, (label, block_text) in enumerate(blocks):
        src = structure_source(shown, i, len(blocks))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                structures = CifParser.from_str(block_text).parse_structures(primitive=False, on_error="raise")
            except Exception as exc:  # noqa: BLE001
                notes = "; ".join(_first_line(str(w.message)) for w in caught)
                reason = _brief(exc) + (f" ({notes})" if notes else "")
                raise StructureError(f"{src}: pymatgen cannot build the structure of {label}: {reason}") from None
        if not structures:
            raise StructureError(f"{src}: {label} gives no structure")
        records.append(pymatgen_record(structures[0], src))
        records[-1].where = label
    return records


def _json(text: str, shown: str, **_: Any) -> list[Record]:
    from pymatgen.core import Molecule, Structure

    from equiformer.data.convert import pymatgen_record

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StructureError(f"{shown} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    items = obj if isinstance(obj, list) else [obj]
    if not items:
        raise StructureError(f"{shown}: empty JSON list (no structures)")
    records = []
    for i, d in enumerate(items):
        src = structure_source(shown, i, len(items))
        if isinstance(d, dict) and "sites" not in d and isinstance(d.get("structure"), dict):
            d = d["structure"]  # an entry / database document holding a structure
        if not isinstance(d, dict) or "sites" not in d:
            keys = ", ".join(list(d)[:6]) if isinstance(d, dict) else type(d).__name__
            raise StructureError(f"{src}: not a pymatgen Structure or Molecule dictionary (found: {keys})")
        cls = Structure if "lattice" in d else Molecule
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pmg = cls.from_dict(d)
        except Exception as exc:  # noqa: BLE001
            raise StructureError(f"{src}: cannot build a pymatgen {cls.__name__} ({_brief(exc)})") from None
        records.append(pymatgen_record(pmg, src))
    return records


def _read_ase(p: Path, shown: str, fmt: str | None) -> list[Record]:
    import ase.io

    from equiformer.data.convert import ase_record

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            frames = ase.io.read(str(p), index=":", format=fmt)
        except Exception as exc:  # noqa: BLE001 - ASE raises many kinds of errors
            what = f"as {fmt}" if fmt else "with ASE"
            raise StructureError(f"{shown}: cannot read the file {what} ({_brief(exc)})") from None
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise StructureError(f"{shown}: no structures in the file")
    return [ase_record(a) for a in frames]


def _first_line(s: str) -> str:
    return s.strip().splitlines()[0] if s.strip() else ""


def _brief(exc: BaseException) -> str:
    msg = _first_line(str(exc))
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


_TEXT_READERS: dict[str, Callable[..., list[Record]]] = {
    "xyz": _xyz,
    "extxyz": _xyz,
    "sdf": _sdf,
    "mol": _sdf,
    "cif": _cif,
    "poscar": _poscar,
    "pdb": _pdb,
    "json": _json,
}
