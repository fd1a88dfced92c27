"""A small VASP POSCAR / CONTCAR reader with line-numbered errors.

Layout (VASP 5): comment; scale (one number, negative = target volume in Å^3, or three
per-axis factors); three lattice vectors (rows, Å); element symbols; counts; optional
``Selective dynamics``; ``Direct`` or ``Cartesian``; one line per atom. VASP 4 files
(no element line) are read when the comment line names the elements. Atoms whose three
selective-dynamics flags are all ``F`` are marked in ``fixed``. Velocities and anything
after the positions are ignored.
"""

from __future__ import annotations

import numpy as np
import torch

from equiformer.data.contract import ATOMIC_NUMBERS, StructureError
from equiformer.data.records import Record


def _symbol(tok: str) -> str | None:
    """Element of a POTCAR-style label: ``Fe``, ``Fe_pv``, ``Fe_pv/7a3c...`` -> ``Fe``; None if not one."""
    base = tok.split("/")[0].split("_")[0]
    base = base[:1].upper() + base[1:].lower()
    return base if base in ATOMIC_NUMBERS else None


def parse_poscar(text: str, path: str) -> list[Record]:
    """Parse the text of a POSCAR/CONTCAR file into one periodic structure."""
    lines = text.splitlines()

    def line(k: int, what: str) -> str:
        if k >= len(lines):
            raise StructureError(f"{path} line {k + 1}: file ends before the {what}")
        return lines[k]

    def floats(k: int, what: str, n: int | tuple[int, ...]) -> list[float]:
        tok = line(k, what).split()
        counts = (n,) if isinstance(n, int) else n
        for m in sorted(counts, reverse=True):
            if len(tok) >= m:
                try:
                    return [float(t) for t in tok[:m]]
                except ValueError:
                    continue
        want = " or ".join(str(m) for m in counts)
        raise StructureError(f"{path} line {k + 1}: expected {want} numbers ({what}), got {line(k, what).strip()!r}")

    if not text.strip():
        raise StructureError(f"{path}: file is empty")
    comment = lines[0].strip()
    scale = floats(1, "scale factor", (3, 1))
    lattice = np.array([floats(2 + k, f"lattice vector {k + 1}", 3) for k in range(3)])
    if len(scale) == 3:
        lattice = lattice * np.asarray(scale)[None, :]
        factor = np.asarray(scale)
    elif scale[0] < 0:
        vol = abs(np.linalg.det(lattice))
        if vol < 1e-12:
            raise StructureError(f"{path} line 3: lattice vectors are degenerate (volume 0)")
        f = (-scale[0] / vol) ** (1.0 / 3.0)
        lattice = lattice * f
        factor = np.full(3, f)
    else:
        if scale[0] == 0:
            raise StructureError(f"{path} line 2: scale factor is 0")
        lattice = lattice * scale[0]
        factor = np.full(3, scale[0])

    k = 5
    tok = line(k, "element symbols or atom counts").split()
    if all(t.isdigit() for t in tok):  # VASP 4: no element line, try the comment
        counts = [int(t) for t in tok]
        names = [_symbol(t) for t in comment.split()[: len(counts)]]
        if len(comment.split()) < len(counts) or any(s is None for s in names):
            raise StructureError(
                f"{path} line 6: no element symbols (VASP 4 format) and the comment line does not name "
                f"{len(counts)} elements; add a line with the element symbols above the counts"
            )
        symbols = [s for s in names if s is not None]
        k += 1
    else:
        symbols = []
        for t in tok:
            s = _symbol(t)
            if s is None:
                raise StructureError(f"{path} line 6: unknown element {t!r} in the element line")
            symbols.append(s)
        k += 1
        ctok = line(k, "atom counts").split()
        if not ctok or not all(t.isdigit() for t in ctok[: len(symbols)]) or len(ctok) < len(symbols):
            raise StructureError(
                f"{path} line {k + 1}: expected {len(symbols)} atom counts (one per element "
                f"{' '.join(symbols)}), got {line(k, 'atom counts').strip()!r}"
            )
        counts = [int(t) for t in ctok[: len(symbols)]]
        k += 1
    n = sum(counts)
    if n == 0:
        raise StructureError(f"{path}: the counts line gives 0 atoms (empty structure)")

    selective = line(k, "coordinate mode (Direct or Cartesian)").strip()[:1].lower() == "s"
    if selective:
        k += 1
    mode = line(k, "coordinate mode (Direct or Cartesian)").strip()[:1].lower()
    if mode not in ("d", "c", "k"):
        raise StructureError(
            f"{path} line {k + 1}: expected 'Direct' or 'Cartesian', got {line(k, 'coordinate mode').strip()!r}"
        )
    k += 1
    cart = mode in ("c", "k")
    coords = np.empty((n, 3))
    fixed = np.zeros(n, dtype=bool)
    for a in range(n):
        if k + a >= len(lines):
            raise StructureError(f"{path} line {k + a + 1}: file ends after {a} of {n} atom positions")
        t = lines[k + a].split()
        where = f"{path} line {k + a + 1}"
        if len(t) < 3:
            raise StructureError(f"{where}: expected 3 coordinates, got {len(t)} columns")
        try:
            coords[a] = [float(v) for v in t[:3]]
        except ValueError:
            raise StructureError(f"{where}: cannot read coordinates {' '.join(t[:3])!r} as numbers") from None
        if selective:
            if len(t) < 6 or any(f.upper() not in ("T", "F") for f in t[3:6]):
                raise StructureError(f"{where}: expected 3 selective-dynamics flags (T/F) after the coordinates")
            fixed[a] = all(f.upper() == "F" for f in t[3:6])
    pos = coords * factor[None, :] if cart else coords @ lattice
    z = np.repeat([ATOMIC_NUMBERS[s] for s in symbols], counts).astype(np.int64)
    extra: dict = {"name": comment}
    if selective:
        extra["fixed"] = torch.as_tensor(fixed)
    return [Record(z=z, pos=pos, cell=lattice, pbc=np.ones(3, dtype=bool), extra=extra)]
