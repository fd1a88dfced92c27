"""`equiformer bench`: speed (and GPU memory) measurements against peer libraries.

    equiformer bench neighbors [--device cpu|cuda] [--sizes 100 1k 10k 100k] [--out r.json] [--markdown r.md]
"""

from __future__ import annotations

import argparse
import sys

HELP = "measure speed and memory against peer libraries"


def add_neighbors_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the neighbour-list benchmark (shared with benchmarks/bench_neighbors.py)."""
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu); ASE always runs on the CPU")
    p.add_argument("--sizes", nargs="+", default=["100", "1k", "10k", "100k"], help="atom counts (default 100 1k 10k 100k)")
    p.add_argument("--systems", nargs="+", default=None, help="subset of Cu-fcc Si-diamond cluster (default all)")
    p.add_argument("--cutoff", type=float, default=5.0, help="cutoff radius in Å (default 5)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-ase", action="store_true", help="do not run ASE even if it is installed")
    p.add_argument("--ase-json", default=None, help="take ASE timings from a previous benchmark JSON (e.g. a CPU run)")
    p.add_argument("--out", default=None, help="write the results as JSON to this path")
    p.add_argument("--markdown", default=None, help="write the markdown table to this path")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    sub = parser.add_subparsers(dest="bench_what", metavar="WHAT")
    p = sub.add_parser(
        "neighbors",
        help="neighbour lists: ours vs ASE's neighbor_list on Cu/Si supercells and a cluster",
        description="Time equiformer.graph.radius_graph_pbc against ase.neighborlist.neighbor_list.",
    )
    add_neighbors_arguments(p)
    parser.set_defaults(_bench_parser=parser)


def run_neighbors(args: argparse.Namespace) -> int:
    import json

    import torch

    from equiformer.graph.bench import SYSTEMS, load_ase_timings, markdown_table, parse_sizes, run_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    if args.cutoff <= 0:
        raise ValueError("--cutoff must be positive")
    systems = args.systems or list(SYSTEMS)
    for s in systems:
        if s not in SYSTEMS:
            raise ValueError(f"unknown system {s!r}; choose from {', '.join(SYSTEMS)}")
    ase_timings = load_ase_timings(args.ase_json) if args.ase_json else None
    result = run_benchmark(
        parse_sizes(args.sizes),
        systems,
        device=args.device,
        cutoff=args.cutoff,
        dtype=getattr(torch, args.dtype),
        repeats=args.repeats,
        ase=not args.no_ase,
        ase_timings=ase_timings,
        ase_source=args.ase_json,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    table = markdown_table(result)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "bench_what", None) == "neighbors":
        return run_neighbors(args)
    args._bench_parser.print_help()
    return 0
