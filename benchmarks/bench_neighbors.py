"""Neighbour-list speed: equiformer.graph.radius_graph_pbc vs ase.neighborlist.neighbor_list.

    python benchmarks/bench_neighbors.py --device cpu --threads 1 --out cpu.json --markdown cpu.md
    python benchmarks/bench_neighbors.py --device cuda --out gpu.json --ase-json cpu.json   # GPU box without ASE

Same options as ``equiformer bench neighbors``; see ``--help``.
"""

from __future__ import annotations

import argparse
import sys

from equiformer.commands.bench import add_neighbors_arguments, run_neighbors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_neighbors_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_neighbors(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"bench_neighbors: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
