"""``equiformer data``: look at structure files.

``equiformer data inspect FILE [FILE ...] [--format table|json]`` reads each file with
:func:`equiformer.data.read` and prints, per structure: source and index, formula, number
of atoms, periodicity, cell (Å) with lattice parameters and volume, and whether energy and
forces are present. A bad file gives one line ``equiformer data: error: FILE...`` and exit
code 2 (raised as ValueError / FileNotFoundError and reported by :mod:`equiformer.cli`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

HELP = "read structure files and datasets: 'data inspect FILE' shows what was read"

_FORMATS_HELP = "xyz, extxyz, sdf, mol, cif, poscar, pdb, json (pymatgen), traj (ASE), or ase:<format>"


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    p = sub.add_parser(
        "inspect",
        help="show what a structure file holds: formula, atoms, cell, pbc, energy/forces",
        description=(
            "Read structure files as equiformer reads them and show, per structure: formula, number of atoms, "
            "periodic directions, cell (Å) with a, b, c, alpha, beta, gamma and volume, and whether energy "
            f"(eV) and forces (eV/Å) are present. Formats: {_FORMATS_HELP}."
        ),
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="structure files (format from the extension)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    p.add_argument(
        "--file-format",
        default=None,
        metavar="FMT",
        help=f"read every FILE as this format instead of guessing from its name ({_FORMATS_HELP})",
    )
    p.add_argument(
        "--max",
        type=int,
        default=20,
        metavar="N",
        help="table: show at most N structures per file (0 = all; default 20); json always lists all",
    )
    p.add_argument(
        "--no-overlap-check",
        action="store_true",
        help="do not reject atoms closer than 0.1 Å",
    )
    parser.set_defaults(_data_parser=parser)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "data_command", None) != "inspect":
        args._data_parser.print_help()
        return 0 if args.data_command is None else 2
    return _inspect(args)


def _inspect(args: argparse.Namespace) -> int:
    import torch

    from equiformer.data import describe, read

    results: list[tuple[str, list[dict[str, Any]]]] = []
    for path in args.files:
        # float64: show the numbers as the file has them
        datas = read(path, format=args.file_format, check_overlap=not args.no_overlap_check, dtype=torch.float64)
        results.append((path, [describe(d) for d in datas]))
    if args.format == "json":
        out = [dict(file=path, **s) for path, summaries in results for s in summaries]
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    blocks = []
    for path, summaries in results:
        blocks.append(format_file(path, summaries, args.max))
    sys.stdout.write("\n\n".join(blocks) + "\n")
    return 0


def format_file(path: str, summaries: list[dict[str, Any]], limit: int = 20) -> str:
    """Plain-text report of one file's structures (at most ``limit``; 0 = all)."""
    n = len(summaries)
    lines = [f"{path}: {n} structure{'s' if n != 1 else ''}"]
    shown = summaries if limit <= 0 else summaries[:limit]
    for s in shown:
        lines.append("")
        lines.extend(format_structure(s))
    if len(shown) < n:
        lines.append("")
        lines.append(f"... {n - len(shown)} more structures not shown (use --max 0 to show all)")
    return "\n".join(lines)


def _count_list(elements: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in elements.items())


def format_structure(s: dict[str, Any]) -> list[str]:
    """Plain-text lines describing one structure summary from :func:`equiformer.data.describe`."""
    label = s["source"] + (f"  (index {s['index']})" if s["index"] is not None else "")
    out = [label]

    def row(key: str, value: str) -> None:
        out.append(f"  {key:<10} {value}")

    row("formula", f"{s['formula']}  ({s['n_atoms']} atoms: {_count_list(s['elements'])})")
    if s["name"]:
        row("name", s["name"])
    if s["smiles"]:
        row("SMILES", s["smiles"])
    if s.get("chains"):
        chains = " ".join(c or "(blank)" for c in s["chains"])
        row("protein", f"{s['n_residues']} residues in chain{'s' if len(s['chains']) > 1 else ''} {chains}")
    pbc = s["pbc"]
    axes = [ax for ax, p in zip("abc", pbc) if p]
    if all(pbc):
        row("periodic", "yes, in 3D (a crystal)")
    elif any(pbc):
        row("periodic", f"along {' '.join(axes)} only (e.g. a slab or wire)")
    elif s["cell"] is not None:
        row("periodic", "no (a cell is given but not periodic)")
    else:
        row("periodic", "no (a molecule: no cell)")
    if s["cell"] is not None:
        for k, (ax, vec) in enumerate(zip("abc", s["cell"])):
            key = "cell (Å)" if k == 0 else ""
            row(key, f"{ax} = " + "  ".join(f"{v:12.6f}" for v in vec))
        lat = s["lattice"]
        if lat is not None:
            row(
                "lattice",
                f"a = {lat['a']:.4f} Å, b = {lat['b']:.4f} Å, c = {lat['c']:.4f} Å, "
                f"α = {lat['alpha']:.2f}°, β = {lat['beta']:.2f}°, γ = {lat['gamma']:.2f}°",
            )
        if s["volume"] is not None:
            row("volume", f"{s['volume']:.4f} Å³")
    row("energy", f"{s['energy']:.6f} eV" if s["energy"] is not None else "not in the file")
    if s["forces"]:
        row("forces", f"yes (largest |F| = {s['max_force']:.4f} eV/Å)")
    else:
        row("forces", "not in the file")
    if s["n_fixed"] is not None:
        row("fixed", f"{s['n_fixed']} of {s['n_atoms']} atoms held fixed")
    return out
