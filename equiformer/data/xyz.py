"""A small XYZ / extended-XYZ reader with line-numbered errors.

Plain XYZ: a count line, a comment line (kept as ``name``), then one ``element x y z``
line per atom (further columns are ignored; the element may be a symbol or an atomic
number; Mathematica's ``1.2*^-6`` number style of QM9's original files is accepted).
Several structures may follow each other. QM9's original ``dsgdb9nsd_*.xyz`` files, whose
comment starts with ``gdb`` and which carry three more lines (frequencies, SMILES, InChI),
are read as well, keeping the SMILES.

Extended XYZ (the comment holds ``key=value`` pairs with ``Lattice=`` or ``Properties=``):
``Lattice="ax ay az bx by bz cx cy cz"`` (Å, rows), ``pbc="T T T"`` (default: periodic
when a lattice is given), ``Properties=species:S:1:pos:R:3:forces:R:3...``, the energy under
``energy=`` (eV). Per-atom ``forces`` (eV/Å), ``tags`` and ASE's ``move_mask`` (-> ``fixed``)
are kept.
"""

from __future__ import annotations

import shlex

import numpy as np
import torch

from equiformer.data.contract import ATOMIC_NUMBERS, MAX_Z, StructureError
from equiformer.data.records import Record

_TRUE = {"t", "true", "1"}
_FALSE = {"f", "false", "0"}


def _float(tok: str) -> float:
    return float(tok.replace("*^", "e"))


def _element(tok: str, where: str) -> int:
    if tok.lstrip("+-").isdigit():
        zi = int(tok)
        if not 1 <= zi <= MAX_Z:
            raise StructureError(f"{where}: unknown atomic number {zi}")
        return zi
    key = tok[:1].upper() + tok[1:].lower()
    if key not in ATOMIC_NUMBERS:
        raise StructureError(f"{where}: unknown element {tok!r}")
    return ATOMIC_NUMBERS[key]


def _bool(tok: str, where: str) -> bool:
    t = tok.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise StructureError(f"{where}: expected a logical value (T or F), got {tok!r}")


def parse_comment(comment: str, where: str) -> dict[str, str | bool]:
    """Split an extended-XYZ comment line into ``{key: value}`` (bare keys map to True)."""
    try:
        tokens = shlex.split(comment, posix=True)
    except ValueError as exc:
        raise StructureError(f"{where}: cannot split the comment line into key=value pairs ({exc})") from None
    out: dict[str, str | bool] = {}
    for tok in tokens:
        if "=" in tok:
            key, value = tok.split("=", 1)
            out[key.strip()] = value.strip()
        else:
            out[tok] = True
    return out


def is_extended(comment: str) -> bool:
    """True when a comment line looks like extended XYZ (has ``Lattice=`` or ``Properties=``)."""
    low = comment.lower()
    return "lattice=" in low or "properties=" in low


def _properties(spec: str, where: str) -> list[tuple[str, str, int]]:
    parts = spec.split(":")
    if len(parts) % 3:
        raise StructureError(f"{where}: Properties={spec!r} is not a list of name:type:columns triples")
    props = []
    for k in range(0, len(parts), 3):
        name, kind, ncol = parts[k], parts[k + 1].upper(), parts[k + 2]
        if kind not in ("S", "R", "I", "L") or not ncol.isdigit() or int(ncol) < 1:
            raise StructureError(
                f"{where}: Properties entry {name}:{parts[k + 1]}:{ncol} is not name:type:columns "
                "with type S, R, I or L"
            )
        props.append((name, kind, int(ncol)))
    return props


def parse_xyz(
    text: str, path: str, energy_key: str = "energy", forces_key: str = "forces"
) -> list[Record]:
    """Parse the text of an XYZ or extended-XYZ file (one or several structures).

    Args:
        text: file contents.
        path: file name used in error messages.
        energy_key: comment key holding the energy in eV (extended XYZ; case-insensitive).
        forces_key: per-atom property holding the forces in eV/Å (extended XYZ).
    """
    lines = text.splitlines()
    records: list[Record] = []
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        count_line = lines[i].strip()
        head = i + 1  # 1-based line number of the count line
        if not count_line.isdigit():
            what = "the number of atoms" if not records else f"the number of atoms of structure {len(records)}"
            raise StructureError(f"{path} line {head}: expected {what} (an integer), got {_short(count_line)!r}")
        n = int(count_line)
        if n == 0:
            raise StructureError(f"{path} line {head}: number of atoms is 0 (empty structure)")
        if i + 1 >= len(lines):
            raise StructureError(f"{path} line {head + 1}: file ends before the comment line")
        comment = lines[i + 1]
        atom_lines = lines[i + 2 : i + 2 + n]
        if len(atom_lines) < n:
            raise StructureError(
                f"{path} line {head + 1 + len(atom_lines)}: file ends after {len(atom_lines)} of {n} atom lines"
                f" (the count on line {head} says {n})"
            )
        if is_extended(comment):
            rec = _extended(comment, atom_lines, path, head, energy_key, forces_key)
        else:
            rec = _plain(comment, atom_lines, path, head)
        i += 2 + n
        if comment.strip().startswith("gdb") and i < len(lines) and lines[i].strip() and not lines[i].strip().isdigit():
            # QM9's original files: frequencies, SMILES (GDB then relaxed), InChI after the atoms.
            extra = lines[i : i + 3]
            if len(extra) >= 2 and extra[1].split():
                rec.extra["smiles"] = extra[1].split()[0]
            i += len(extra)
        records.append(rec)
    if not records:
        raise StructureError(f"{path}: file is empty (no structures)")
    return records


def _short(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _plain(comment: str, atom_lines: list[str], path: str, head: int) -> Record:
    n = len(atom_lines)
    z = np.empty(n, dtype=np.int64)
    pos = np.empty((n, 3))
    for k, line in enumerate(atom_lines):
        ln = head + 2 + k
        where = f"{path} line {ln}"
        tok = line.split()
        if len(tok) < 4:
            raise StructureError(f"{where}: expected 4 columns (element x y z), got {len(tok)}")
        z[k] = _element(tok[0], where)
        try:
            pos[k] = [_float(t) for t in tok[1:4]]
        except ValueError:
            bad = next(t for t in tok[1:4] if not _is_float(t))
            raise StructureError(f"{where}: cannot read coordinate {bad!r} as a number") from None
    return Record(z=z, pos=pos, where=f"structure at line {head}", extra={"name": comment.strip()})


def _is_float(t: str) -> bool:
    try:
        _float(t)
        return True
    except ValueError:
        return False


def _extended(
    comment: str, atom_lines: list[str], path: str, head: int, energy_key: str, forces_key: str
) -> Record:
    cwhere = f"{path} line {head + 1}"
    info = parse_comment(comment, cwhere)
    lower = {k.lower(): v for k, v in info.items()}
    props = _properties(str(lower.get("properties", "species:S:1:pos:R:3")), cwhere)
    names = [p[0] for p in props]
    if "pos" not in names:
        raise StructureError(f"{cwhere}: Properties has no 'pos' column (Cartesian positions)")
    if "species" not in names and "Z" not in names:
        raise StructureError(f"{cwhere}: Properties has neither 'species' nor 'Z' (the elements)")
    ncols = sum(p[2] for p in props)
    layout = " ".join(f"{name}" if c == 1 else f"{name}[{c}]" for name, _, c in props)

    cell = None
    pbc = np.zeros(3, dtype=bool)
    if "lattice" in lower:
        try:
            vals = [_float(t) for t in str(lower["lattice"]).split()]
        except ValueError:
            vals = []
        if len(vals) != 9:
            raise StructureError(f"{cwhere}: Lattice must hold 9 numbers (3 lattice vectors), got {lower['lattice']!r}")
        cell = np.asarray(vals).reshape(3, 3)
        pbc[:] = True
    if "pbc" in lower:
        flags = str(lower["pbc"]).split()
        if len(flags) == 1:
            flags = flags * 3
        if len(flags) != 3:
            raise StructureError(f"{cwhere}: pbc must hold 3 logical values, got {lower['pbc']!r}")
        pbc = np.array([_bool(f, cwhere) for f in flags])
    if pbc.any() and cell is None:
        raise StructureError(f"{cwhere}: pbc says periodic but there is no Lattice (the cell)")

    columns: dict[str, list] = {name: [] for name in names}
    for k, line in enumerate(atom_lines):
        where = f"{path} line {head + 2 + k}"
        tok = line.split()
        if len(tok) < ncols:
            raise StructureError(f"{where}: expected {ncols} columns ({layout}), got {len(tok)}")
        c = 0
        for name, kind, width in props:
            vals = tok[c : c + width]
            c += width
            try:
                if kind == "R":
                    parsed: list = [_float(v) for v in vals]
                elif kind == "I":
                    parsed = [int(v) for v in vals]
                elif kind == "L":
                    parsed = [_bool(v, where) for v in vals]
                else:
                    parsed = vals
            except ValueError:
                raise StructureError(f"{where}: cannot read {name} value {' '.join(vals)!r} as {_KIND[kind]}") from None
            if name == "species":
                columns[name].append(_element(parsed[0], where))
            elif name == "Z":
                columns[name].append(_element(str(parsed[0]), where))
            else:
                columns[name].append(parsed if width > 1 else parsed[0])

    z = np.asarray(columns["species"] if "species" in columns else columns["Z"], dtype=np.int64)
    pos = np.asarray(columns["pos"], dtype=np.float64).reshape(len(z), -1)
    if pos.shape[1] != 3:
        raise StructureError(f"{cwhere}: pos must have 3 columns, Properties gives {pos.shape[1]}")
    extra: dict = {"name": str(lower.get("name", ""))}
    forces = None
    if forces_key in columns:
        forces = np.asarray(columns[forces_key], dtype=np.float64).reshape(len(z), -1)
        if forces.shape[1] != 3:
            raise StructureError(f"{cwhere}: {forces_key} must have 3 columns, Properties gives {forces.shape[1]}")
    energy = None
    ekey = energy_key.lower()
    if ekey in lower:
        value = lower[ekey]
        try:
            energy = _float(str(value))
        except ValueError:
            raise StructureError(f"{cwhere}: {energy_key}={value!r} is not a number") from None
    if "tags" in columns:
        extra["tags"] = torch.as_tensor(np.asarray(columns["tags"], dtype=np.int64))
    if "move_mask" in columns:
        mask = np.asarray(columns["move_mask"], dtype=bool).reshape(len(z), -1)
        extra["fixed"] = torch.as_tensor(~mask.any(axis=1))
    return Record(
        z=z, pos=pos, cell=cell, pbc=pbc, energy=energy, forces=forces, where=f"structure at line {head}", extra=extra
    )


_KIND = {"R": "a real number", "I": "an integer", "L": "a logical (T/F)", "S": "a string"}
