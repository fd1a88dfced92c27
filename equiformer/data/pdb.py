"""A small PDB reader (ATOM/HETATM records) with line-numbered errors.

Coordinates come from the fixed columns 31-54, the element from columns 77-78 (or, when
those are blank, from the atom name in columns 13-16). Each ``MODEL`` ... ``ENDMDL`` block
is one structure; a file without ``MODEL`` records is one structure. Of alternate
locations only the first one met for each atom is kept (``altLoc`` blank or the first
letter). Deuterium (``D``) is read as hydrogen. A PDB file is read as a molecule: the
``CRYST1`` cell of a protein crystal describes the crystal packing, not a periodic system a
model should see, so cell is zero and pbc False. Per-atom ``atom_names``, ``residues`` and
``chains`` (lists of str) and ``residue_numbers`` (long [N]) are kept for protein work.
"""

from __future__ import annotations

import numpy as np
import torch

from equiformer.data.contract import ATOMIC_NUMBERS, StructureError
from equiformer.data.records import Record

_ALIASES = {"D": "H", "T": "H"}


def _element(line: str, where: str) -> int:
    sym = line[76:78].strip() if len(line) >= 77 else ""
    if sym:
        candidates = [sym.rstrip("+-0123456789")]
    else:
        # no element column: the atom name (columns 13-16) holds a right-justified element in
        # columns 13-14, e.g. " CA " is carbon, "FE  " iron, "1HB " and "HD21" hydrogen
        name = line[12:16]
        letters = "".join(c for c in name if c.isalpha())
        two = "".join(c for c in name[:2] if c.isalpha())
        # ATOM records (standard residues) hold one-letter elements only: "HG12" is hydrogen
        atom_record = line[:6].strip().upper() == "ATOM"
        candidates = [two, letters[:1]] if len(two) == 2 and not atom_record else [letters[:1]]
    for cand in candidates:
        key = cand[:1].upper() + cand[1:].lower()
        key = _ALIASES.get(key, key)
        if key in ATOMIC_NUMBERS:
            return ATOMIC_NUMBERS[key]
    raise StructureError(
        f"{where}: unknown element {candidates[0]!r} (columns 77-78, atom name {line[12:16].strip()!r})"
    )


def parse_pdb(text: str, path: str) -> list[Record]:
    """Parse the text of a PDB file into one structure per MODEL (or one for the whole file)."""
    records: list[Record] = []
    atoms: list[tuple[int, list[float], str, str, str, int]] = []
    seen_alt: dict[tuple, str] = {}
    start = 1
    in_model = False

    def flush(end_line: int) -> None:
        nonlocal atoms, seen_alt
        if atoms:
            z = np.array([a[0] for a in atoms], dtype=np.int64)
            pos = np.array([a[1] for a in atoms], dtype=np.float64)
            extra = {
                "name": "",
                "atom_names": [a[2] for a in atoms],
                "residues": [a[3] for a in atoms],
                "chains": [a[4] for a in atoms],
                "residue_numbers": torch.tensor([a[5] for a in atoms], dtype=torch.long),
            }
            records.append(Record(z=z, pos=pos, where=f"model at line {start}" if in_model else "", extra=extra))
        atoms, seen_alt = [], {}

    title = ""
    for ln, line in enumerate(text.splitlines(), start=1):
        rec = line[:6].strip().upper()
        if rec == "HEADER" and not title:
            title = line[10:50].strip()
        elif rec == "MODEL":
            flush(ln)
            start, in_model = ln, True
        elif rec == "ENDMDL":
            flush(ln)
            start = ln + 1
        elif rec in ("ATOM", "HETATM"):
            where = f"{path} line {ln}"
            if len(line) < 54:
                raise StructureError(
                    f"{where}: {rec} record is {len(line)} characters long; coordinates need columns 31-54"
                )
            try:
                xyz = [float(line[30:38]), float(line[38:46]), float(line[46:54])]
            except ValueError:
                raise StructureError(
                    f"{where}: cannot read coordinates from columns 31-54 ({line[30:54].strip()!r})"
                ) from None
            alt = line[16]
            key = (line[12:16], line[17:20], line[21], line[22:27])
            if alt != " ":
                first = seen_alt.setdefault(key, alt)
                if alt != first:
                    continue
            try:
                resseq = int(line[22:26])
            except ValueError:
                resseq = 0
            names = (line[12:16].strip(), line[17:20].strip(), line[21].strip())
            atoms.append((_element(line, where), xyz, *names, resseq))
        elif rec == "END":
            break
    flush(0)
    if not records:
        raise StructureError(f"{path}: no ATOM or HETATM records (not a PDB file, or an empty one)")
    for r in records:
        r.extra["name"] = title
    return records
