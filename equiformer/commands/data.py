"""`equiformer data` (placeholder until its owner fills it in)."""

from __future__ import annotations

import argparse

HELP = "data"


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("rest", nargs="*")


def run(args: argparse.Namespace) -> int:
    raise SystemExit("equiformer: this subcommand is not available yet")
