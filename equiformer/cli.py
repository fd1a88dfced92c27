"""The ``equiformer`` command line.

Each subcommand lives in its own module under :mod:`equiformer.commands` exposing
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; modules are
imported only when their subcommand runs, so ``equiformer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module under equiformer.commands, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "predict": ("predict", "predict properties of molecules (SMILES, XYZ, SDF) or crystals (CIF, POSCAR) with a shipped model"),
    "train": ("train", "train a model from a YAML config, e.g. configs/qm9/equiformer_homo.yaml"),
    "test": ("train", "evaluate a trained checkpoint on a dataset's test split"),
    "data": ("data", "read structure files and datasets: 'data inspect FILE' shows what was read"),
    "bench": ("bench", "measure speed and memory (neighbour lists, models) against peer libraries"),
}

DESCRIPTION = """\
equiformer: equivariant transformers for molecules, crystals and point clouds.

Typical use:
  equiformer predict "CCO"                 properties of ethanol from a SMILES string
  equiformer predict water.xyz --format csv
  equiformer data inspect NaCl.cif         what the file holds (formula, atoms, cell, pbc)
  equiformer train --config configs/qm9/equiformer_homo.yaml

Units: energies in eV (meV in error tables), lengths in Å, unless a column says otherwise.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="equiformer", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from equiformer import __version__

    parser.add_argument("--version", action="version", version=f"equiformer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, _command=name)
        # Argument definitions are small and imported eagerly; heavy imports stay inside run().
        mod = importlib.import_module(f"equiformer.commands.{module}")
        mod.add_arguments(p, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    mod = importlib.import_module(f"equiformer.commands.{args._module}")
    try:
        return int(mod.run(args) or 0)
    except (ValueError, FileNotFoundError) as exc:  # clear, one-line errors for bad input
        print(f"equiformer {args._command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
