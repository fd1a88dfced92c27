"""Speed of :func:`radius_graph_pbc` against ASE's ``neighbor_list`` (the code behind ``equiformer bench neighbors``).

Systems (built with numpy only, so the benchmark runs where ASE is not installed):

* ``Cu-fcc``: bulk fcc Cu supercell (a = 3.615 Å, periodic), slightly rattled;
* ``Si-diamond``: bulk diamond Si supercell (a = 5.431 Å, periodic), slightly rattled;
* ``cluster``: a spherical fcc Cu cluster, not periodic (molecule-like); ASE gets a bounding-box
  cell for it (pbc False), since with a zero cell its neighbor_list needs > 8 GB at 10k atoms.

Each size N is rounded to the nearest supercell / cluster. Times are medians in seconds.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .radius import radius_graph_pbc

__all__ = ["SYSTEMS", "System", "make_system", "run_benchmark", "markdown_table"]

SYSTEMS = ("Cu-fcc", "Si-diamond", "cluster")
_FCC = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
_DIAMOND = np.concatenate([_FCC, _FCC + 0.25])


@dataclass
class System:
    name: str
    positions: np.ndarray  # [N, 3] Å
    cell: np.ndarray  # [3, 3] Å
    pbc: np.ndarray  # [3] bool

    @property
    def n(self) -> int:
        return len(self.positions)


def _supercell(basis: np.ndarray, a: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    k = max(1, round((n / len(basis)) ** (1 / 3)))
    grid = np.stack(np.meshgrid(*[np.arange(k)] * 3, indexing="ij"), -1).reshape(-1, 3)
    frac = (grid[:, None, :] + basis[None]).reshape(-1, 3)
    return frac * a, np.eye(3) * a * k


def make_system(name: str, n: int, seed: int = 0) -> System:
    """A benchmark system of about ``n`` atoms (see module docstring)."""
    rng = np.random.default_rng(seed)
    if name == "Cu-fcc":
        pos, cell = _supercell(_FCC, 3.615, n)
        pbc = np.ones(3, dtype=bool)
    elif name == "Si-diamond":
        pos, cell = _supercell(_DIAMOND, 5.431, n)
        pbc = np.ones(3, dtype=bool)
    elif name == "cluster":
        pos, _ = _supercell(_FCC, 3.615, int(n * 2.2) + 8)
        centre = pos.mean(axis=0)
        r = np.linalg.norm(pos - centre, axis=1)
        pos = pos[np.argsort(r, kind="stable")[:n]]
        pos = pos - pos.min(axis=0) + 1.0  # inside the positive octant (see _ase_atoms)
        cell, pbc = np.zeros((3, 3)), np.zeros(3, dtype=bool)
    else:
        raise ValueError(f"unknown benchmark system {name!r}; choose from {', '.join(SYSTEMS)}")
    pos = pos + rng.normal(scale=0.05, size=pos.shape)
    return System(name, pos, cell, pbc)


def _ase_atoms(atoms_cls: Any, sysm: System) -> Any:
    """ASE Atoms of a system; a molecule gets a bounding-box cell (pbc stays False).

    With a zero cell ASE's neighbor_list bins a huge box: > 8 GB of memory at 10k atoms. A box
    around the (positive-octant) atoms is how ASE is best used, so we time that.
    """
    cell = sysm.cell
    if not sysm.pbc.any():
        cell = np.diag(sysm.positions.max(axis=0) + 1.0)
    return atoms_cls(numbers=np.full(sysm.n, 29), positions=sysm.positions, cell=cell, pbc=sysm.pbc)


def _compare_with_ase(ours: np.ndarray, ref: np.ndarray, sysm: System, cutoff: float) -> dict[str, Any]:
    """Edge tables (i, j, s0, s1, s2) compared; differences in float32 may only sit on the cutoff."""
    if ours.shape == ref.shape and np.array_equal(ours, ref):
        return {"edges_match_ase": True, "edges_differ": 0, "differ_at_cutoff_only": True}
    row = np.dtype([("f", np.int64, 5)])
    a = np.ascontiguousarray(ours).view(row).ravel()
    b = np.ascontiguousarray(ref).view(row).ravel()
    diff = np.concatenate([np.setdiff1d(a, b), np.setdiff1d(b, a)]).view(np.int64).reshape(-1, 5)
    vec = sysm.positions[diff[:, 1]] + diff[:, 2:] @ sysm.cell - sysm.positions[diff[:, 0]]
    d = np.linalg.norm(vec, axis=1)
    return {
        "edges_match_ase": False,
        "edges_differ": int(len(diff)),
        "differ_at_cutoff_only": bool(np.all(np.abs(d - cutoff) < 1e-4 * cutoff)),
    }


def _median_time(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> tuple[float, Any]:
    out = fn()  # warm-up (and the result)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _sorted_table(i: np.ndarray, j: np.ndarray, s: np.ndarray) -> np.ndarray:
    t = np.concatenate([i[:, None], j[:, None], s], axis=1).astype(np.int64)
    return t[np.lexsort(t.T[::-1])]


def run_benchmark(
    sizes: list[int],
    systems: list[str] | tuple[str, ...] = SYSTEMS,
    device: str = "cpu",
    cutoff: float = 5.0,
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    ase: bool = True,
    ase_timings: dict[tuple[str, int], float] | None = None,
    log: Callable[[str], None] | None = None,
    ase_source: str | None = None,
) -> dict[str, Any]:
    """Time ours (and ASE where available) on each system and size.

    Returns a JSON-serialisable dict: ``{"meta": {...}, "results": [row, ...]}`` where each row holds
    system, n, edges, ours_s, ase_s (None if not run), ratio (= ase_s / ours_s), edges_match_ase and,
    on CUDA, peak_mem_mb.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no CUDA device")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    neighbor_list = None
    if ase:
        try:
            from ase import Atoms
            from ase.neighborlist import neighbor_list
        except ImportError:
            neighbor_list = None
    rows = []
    for name in systems:
        for n in sizes:
            sysm = make_system(name, n)
            pos = torch.tensor(sysm.positions, dtype=dtype, device=dev)
            cell = torch.tensor(sysm.cell, dtype=dtype, device=dev)
            pbc = torch.tensor(sysm.pbc, device=dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            reps = repeats if sysm.n < 50_000 else max(1, min(repeats, 2))
            ours_s, (ei, shift) = _median_time(lambda: radius_graph_pbc(pos, cell, pbc, cutoff), reps, sync)
            row: dict[str, Any] = {
                "system": name, "n": sysm.n, "periodic": bool(sysm.pbc.any()), "cutoff": cutoff,
                "edges": int(ei.shape[1]), "ours_s": ours_s, "ase_s": None, "ratio": None, "edges_match_ase": None,
            }
            if dev.type == "cuda":
                row["peak_mem_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
            if neighbor_list is not None:
                atoms = _ase_atoms(Atoms, sysm)
                ase_reps = 1 if sysm.n >= 50_000 else repeats
                t0 = time.perf_counter()
                ai, aj, aS = neighbor_list("ijS", atoms, cutoff)
                first = time.perf_counter() - t0
                ase_s = first if ase_reps == 1 else _median_time(lambda: neighbor_list("ijS", atoms, cutoff), ase_reps - 1, lambda: None)[0]
                row["ase_s"] = ase_s
                ours_tab = _sorted_table(ei[1].cpu().numpy(), ei[0].cpu().numpy(), shift.cpu().numpy())
                row.update(_compare_with_ase(ours_tab, _sorted_table(ai, aj, aS), sysm, cutoff))
            elif ase_timings and (name, sysm.n) in ase_timings:
                row["ase_s"] = ase_timings[(name, sysm.n)]
            if row["ase_s"] is not None:
                row["ratio"] = row["ase_s"] / ours_s
            rows.append(row)
            if log:
                log(_row_line(row))
            del ei, shift
    meta = {
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cutoff": cutoff,
        "repeats": repeats,
    }
    if ase_timings and neighbor_list is None:
        meta["ase_source"] = ase_source or "a previous benchmark JSON"

    return {"meta": meta, "results": rows}


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _row_line(r: dict[str, Any]) -> str:
    return f"{r['system']:<11} N={r['n']:>7} edges={r['edges']:>9} ours={_fmt(r['ours_s'])}s ase={_fmt(r['ase_s'])}s ratio={_fmt(r['ratio'], 3)}"


def markdown_table(result: dict[str, Any]) -> str:
    """The benchmark as a markdown table (times in ms)."""
    meta = result["meta"]
    mem = any("peak_mem_mb" in r for r in result["results"])
    lines = [
        f"Neighbour list, cutoff {meta['cutoff']} Å, {meta['dtype']}, device {meta['device']}, "
        f"torch {meta['torch']} ({meta['threads']} threads); times are medians in ms.",
        "",
        "| system | atoms | periodic | edges | ours (ms) | ASE (ms) | ASE / ours | same edges as ASE |" + (" peak GPU MiB |" if mem else ""),
        "|---|---:|:---:|---:|---:|---:|---:|:---:|" + ("---:|" if mem else ""),
    ]
    for r in result["results"]:
        ase_ms = None if r["ase_s"] is None else r["ase_s"] * 1e3
        match = {True: "yes", False: "NO", None: "-"}[r["edges_match_ase"]]
        if r["edges_match_ase"] is False and r.get("differ_at_cutoff_only"):
            match = f"{r['edges_differ']} differ, all at cutoff ± {1e-4 * r['cutoff']:.0e} Å"

        lines.append(
            f"| {r['system']} | {r['n']} | {'yes' if r['periodic'] else 'no'} | {r['edges']} | "
            f"{_fmt(r['ours_s'] * 1e3)} | {_fmt(ase_ms)} | {_fmt(r['ratio'], 3)} | {match} |"
            + (f" {r['peak_mem_mb']:.0f} |" if mem else "")
        )
    if meta.get("ase_source"):
        lines.append("")
        lines.append(f"ASE times taken from {meta['ase_source']} (ASE runs on the CPU only).")
    return "\n".join(lines)


def load_ase_timings(path: str) -> dict[tuple[str, int], float]:
    """ASE timings from a previous benchmark JSON (e.g. a CPU run): {(system, n): seconds}."""
    try:
        with open(path) as fh:
            data = json.load(fh)
        return {(r["system"], int(r["n"])): float(r["ase_s"]) for r in data["results"] if r.get("ase_s") is not None}
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a benchmark JSON with ASE timings ({exc})") from None


def parse_sizes(text: list[str]) -> list[int]:
    """Sizes like ``100 1k 10k 1e5`` -> [100, 1000, 10000, 100000]."""
    out = []
    for tok in text:
        for t in tok.split(","):
            t = t.strip().lower()
            if not t:
                continue
            mult = 1
            if t.endswith("k"):
                mult, t = 1000, t[:-1]
            elif t.endswith("m"):
                mult, t = 1_000_000, t[:-1]
            try:
                v = float(t) * mult
            except ValueError:
                raise ValueError(f"bad size {tok!r}: use numbers like 100, 1k, 1e5") from None
            if not (math.isfinite(v) and v >= 1):
                raise ValueError(f"bad size {tok!r}: must be >= 1")
            out.append(int(round(v)))
    return out
