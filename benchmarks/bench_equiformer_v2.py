"""EquiformerV2 training speed and memory, ours and fairchem-core 1.x's, on the same batch.

    # both, each in its own process, the paper's 31M model at its S2EF batch of 8:
    PYTHONPATH=/tmp/site:$PWD python benchmarks/bench_equiformer_v2.py --impl both --presets 31M \\
        --batch 8 --precisions fp32 tf32 bf16 --out eqv2.json --markdown eqv2.md
    # CPU smoke test (small architecture made fairchem-compatible: 600 radial functions, 90 elements)
    python benchmarks/bench_equiformer_v2.py --device cpu --impl both --presets small --batch 2 --threads 1 \\
        --model-kwargs '{"num_radial_basis": 600, "max_num_elements": 90}' --warmup 1 --repeats 2

A training step is: forward (energy + direct forces), loss ``mean|E| + mean ||F||`` (L1 energy, L2MAE
forces against zero labels), backward, gradient-norm clip at 100, AdamW step, zero grad, i.e. what
one optimisation step of the paper's S2EF training costs (data loading excluded). Reported per
implementation, preset and precision: median ms per step over ``--repeats`` after ``--warmup``,
structures per second, edges per structure (each model builds its own graph on the fly: 12 Å,
20 neighbours for the OC20 presets), peak CUDA memory (``max_memory_allocated`` after a reset, so
weights, gradients, AdamW state and activations).

Precisions: ``fp32`` (TF32 off), ``tf32`` (fp32 tensors, TF32 matmuls/convolutions),
``bf16`` (bf16 autocast, TF32 on for what stays fp32).

Architectures: fairchem's ``equiformer_v2`` class with the arguments of the paper's S2EF configs
(``layer_norm_sh``, separable S2 activation, grid MLP FFNs, SiLU, uniform init) mapped from our
config by :func:`peer_fairchem.fairchem_kwargs`. Parameter counts differ by exactly 1,202: our
Gaussian radial basis learns its 600 centres, 600 widths and an output scale and shift, fairchem's
600 Gaussians are fixed buffers. Neighbours: by default both keep exactly the 20 nearest
(``enforce_max_neighbors_strictly``, fairchem's default and the paper's); on these slabs the two edge
sets are identical. ``--keep-ties`` switches both to their tie-keeping mode (ours keeps neighbours
within 0.01 Å of the 20th nearest; fairchem's keeps those within 0.01 Å of the 21st, so it has ~2%
more edges).

Structures are OC20-like adsorbate+slab systems built in numpy (no ASE needed): an fcc Cu(100)
slab of ``--cells`` x ``--cells`` x ``--layers`` conventional cells (4 atoms each) with ``--adsorbates``
light atoms (O, C, H, N) 1.8-2.4 Å above the top layer, positions rattled by 0.05 Å, periodic in
all three directions with 15 Å of vacuum (as fairchem treats OC20 slabs). The default 3 x 3 x 2 + 4
gives 76 atoms, close to OC20's average of 77.8. Both implementations get the same structures.

``--impl both`` runs each implementation in a fresh subprocess (one per preset), so neither sees the
other's allocator state, and prints a markdown table with ratios (speed: fairchem ms / ours ms;
memory: ours / fairchem). fairchem-core 1.10.0 must be importable (``benchmarks/gpu_eqv2.sh``
installs its wheel); :mod:`peer_fairchem` stubs the heavy modules it imports but the model never uses.
The paper (V100, fp16 AMP) reports 7.1 training structures/GPU-s for 31M and 1.8 for 153M.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Batch

from equiformer.data.contract import make_data
from equiformer.models.equiformer_v2 import EquiformerV2

PRECISIONS = ("fp32", "tf32", "bf16")


def slab(seed: int, cells: int, layers: int, adsorbates: int, a: float = 3.61) -> Any:
    """An fcc Cu(100) slab with adsorbates, periodic, 15 Å vacuum (contract Data, float32)."""
    rng = np.random.default_rng(seed)
    basis = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    grid = np.array([[i, j, k] for i in range(cells) for j in range(cells) for k in range(layers)])
    pos = ((grid[:, None, :] + basis[None]) * a).reshape(-1, 3)
    top = pos[:, 2].max()
    ads = np.column_stack(
        [rng.uniform(0, cells * a, adsorbates), rng.uniform(0, cells * a, adsorbates), top + rng.uniform(1.8, 2.4, adsorbates)]
    )
    pos = np.vstack([pos, ads]) + rng.normal(0, 0.05, (len(pos) + adsorbates, 3))
    z = np.concatenate([np.full(len(grid) * 4, 29), rng.choice([8, 6, 1, 7], adsorbates)])
    cell = np.diag([cells * a, cells * a, layers * a + 15.0])
    return make_data(torch.tensor(z), torch.tensor(pos, dtype=torch.float32), cell=torch.tensor(cell, dtype=torch.float32), pbc=torch.tensor([True, True, True]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Any, device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


def _set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def build(impl: str, preset: str, model_kwargs: dict[str, Any], strict: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model, our config) for ``impl`` in {"ours", "fairchem"}; fairchem gets our config mapped."""
    ours = EquiformerV2(preset=preset, max_neighbors_strict=strict, **model_kwargs)
    if impl == "ours":
        return ours, ours.config
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peer_fairchem import FairchemEquiformerV2

    return FairchemEquiformerV2(ours.config, strict_neighbors=strict), ours.config


def run_impl(args: argparse.Namespace, impl: str) -> list[dict[str, Any]]:
    """Time one implementation in this process: every preset x precision."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    if args.direct_forces is not None:
        model_kwargs["direct_forces"] = args.direct_forces == "yes"
    structures = [slab(i, args.cells, args.layers, args.adsorbates) for i in range(args.batch)]
    rows = []
    for preset in args.presets:
        torch.manual_seed(0)
        model, cfg = build(impl, preset, model_kwargs, strict=not args.keep_ties)
        model = model.to(device)
        batch = Batch.from_data_list(structures).to(device)
        if impl == "fairchem":
            batch = model.to_fairchem(batch)
            edges = model.num_edges(batch)
        else:
            edges = model.edges(batch)[0].shape[1]
        params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-3)
        for precision in args.precisions:
            if device.type == "cuda":
                _set_tf32(precision != "fp32")
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
            row: dict[str, Any] = {
                "impl": impl,
                "preset": preset,
                "params": params,
                "precision": precision,
                "batch": args.batch,
                "atoms_per_structure": batch.num_nodes / args.batch,
                "edges_per_structure": edges / args.batch,
                "direct_forces": bool(cfg["direct_forces"]),
            }
            if impl == "fairchem" and model.stubs:
                row["stubs"] = model.stubs

            def train_step() -> None:
                model.train()
                with autocast:
                    out = model(batch)
                loss = out["energy"].float().abs().mean() + out["forces"].float().pow(2).sum(-1).sqrt().mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            def infer() -> None:
                model.eval()
                with torch.no_grad(), autocast:
                    model(batch)

            steps = [("train", train_step)] + ([("infer", infer)] if args.infer else [])
            for name, fn in steps:
                try:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                    times = _time(fn, device, args.warmup, args.repeats)
                    ms = 1000 * statistics.median(times)
                    row[f"{name}_ms"] = round(ms, 2)
                    row[f"{name}_structures_per_s"] = round(args.batch / (ms / 1000), 2)
                    if device.type == "cuda":
                        row[f"{name}_peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                except torch.cuda.OutOfMemoryError:
                    row[f"{name}_ms"] = "OOM"
                    optimizer.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                except (RuntimeError, TypeError, ValueError) as exc:  # e.g. a dtype the peer's code does not support
                    row[f"{name}_ms"] = "error"
                    row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                    optimizer.zero_grad(set_to_none=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model, optimizer, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _child_argv(args: argparse.Namespace, impl: str, preset: str, out: str) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--impl", impl, "--presets", preset, "--out", out,
            "--device", args.device, "--batch", str(args.batch), "--cells", str(args.cells), "--layers", str(args.layers),
            "--adsorbates", str(args.adsorbates), "--precisions", *args.precisions, "--threads", str(args.threads),
            "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    if args.model_kwargs:
        argv += ["--model-kwargs", args.model_kwargs]
    if args.direct_forces is not None:
        argv += ["--direct-forces", args.direct_forces]
    if args.keep_ties:
        argv.append("--keep-ties")
    if args.infer:
        argv.append("--infer")
    return argv


def run_both(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each (preset, implementation) in a fresh subprocess; rows of all of them."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            for impl in ("ours", "fairchem"):
                out = os.path.join(tmp, f"{impl}_{preset}.json")
                proc = subprocess.run(_child_argv(args, impl, preset, out), timeout=args.child_timeout)
                if proc.returncode != 0 or not os.path.exists(out):
                    print(f"{impl} {preset}: exit code {proc.returncode}", file=sys.stderr, flush=True)
                    rows.append({"impl": impl, "preset": preset, "train_ms": f"failed (exit {proc.returncode})"})
                    continue
                with open(out) as f:
                    rows.extend(json.load(f)["rows"])
    return rows


def _num(row: dict[str, Any] | None, key: str) -> float | None:
    v = None if row is None else row.get(key)
    return float(v) if isinstance(v, (int, float)) else None


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per preset and precision: fairchem ms / ours ms (speed-up) and ours / fairchem peak memory."""
    out = []
    keys = list(dict.fromkeys((r["preset"], r["precision"]) for r in rows if r.get("precision") in PRECISIONS))
    for preset, precision in keys:
        o = next((r for r in rows if r["impl"] == "ours" and r["preset"] == preset and r.get("precision") == precision), None)
        f = next((r for r in rows if r["impl"] == "fairchem" and r["preset"] == preset and r.get("precision") == precision), None)
        item: dict[str, Any] = {"preset": preset, "precision": precision}
        for name in ("train", "infer"):
            om, fm = _num(o, f"{name}_ms"), _num(f, f"{name}_ms")
            if om and fm:
                item[f"{name}_speedup"] = round(fm / om, 3)
            og, fg = _num(o, f"{name}_peak_mem_gb"), _num(f, f"{name}_peak_mem_gb")
            if og and fg:
                item[f"{name}_mem_ratio"] = round(og / fg, 3)
        out.append(item)
    return out


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown table of training steps, ours next to fairchem's, with ratios."""
    lines = [f"Device: {meta['device']}; torch {meta['torch']}; fairchem-core {meta.get('fairchem', '-')}; "
             f"batch {meta['batch']} structures; median of {meta['repeats']} steps after {meta['warmup']} warm-up.", "",
             "| preset | precision | params ours / fairchem | edges/structure ours / fairchem | ours ms | fairchem ms "
             "| ours structures/s | fairchem structures/s | speed-up (fairchem ms / ours ms) | ours peak GiB | fairchem peak GiB "
             "| memory ours / fairchem |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for item in ratios(rows):
        preset, precision = item["preset"], item["precision"]
        o = next((r for r in rows if r["impl"] == "ours" and r["preset"] == preset and r.get("precision") == precision), {})
        f = next((r for r in rows if r["impl"] == "fairchem" and r["preset"] == preset and r.get("precision") == precision), {})
        lines.append("| " + " | ".join([
            preset, precision, f"{_fmt(o.get('params'))} / {_fmt(f.get('params'))}",
            f"{_fmt(o.get('edges_per_structure'))} / {_fmt(f.get('edges_per_structure'))}",
            _fmt(o.get("train_ms")), _fmt(f.get("train_ms")),
            _fmt(o.get("train_structures_per_s")), _fmt(f.get("train_structures_per_s")),
            _fmt(item.get("train_speedup")), _fmt(o.get("train_peak_mem_gb")), _fmt(f.get("train_peak_mem_gb")),
            _fmt(item.get("train_mem_ratio")),
        ]) + " |")
    errors = [f"* {r['impl']} {r['preset']} {r.get('precision')}: {r[k]}" for r in rows for k in ("train_error", "infer_error") if k in r]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines)


def _fairchem_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("fairchem-core")
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["ours", "fairchem", "both"], default="ours")
    p.add_argument("--device", default="cuda")
    p.add_argument("--presets", nargs="+", default=["31M"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cells", type=int, default=3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--adsorbates", type=int, default=4)
    p.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16"], choices=PRECISIONS)
    p.add_argument("--model-kwargs", default=None, help="JSON dict of EquiformerV2 arguments over the preset (mapped to fairchem's)")
    p.add_argument("--direct-forces", choices=["yes", "no"], default=None, help="override the preset's force head (ours only)")
    p.add_argument("--keep-ties", action="store_true", help="tie-keeping neighbour caps instead of exactly max_neighbors")
    p.add_argument("--infer", action="store_true", help="also time inference (no grad)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--child-timeout", type=float, default=400.0, help="seconds per subprocess with --impl both")
    p.add_argument("--out", default=None, help="JSON file")
    p.add_argument("--markdown", default=None, help="markdown file for the table (--impl both)")
    args = p.parse_args(argv)
    if args.impl == "fairchem" and args.direct_forces == "no":
        p.error("fairchem's EquiformerV2 in the paper's configs has direct forces only")
    rows = run_both(args) if args.impl == "both" else run_impl(args, args.impl)
    meta = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "fairchem": _fairchem_version(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else (platform.processor() or "cpu"),
        "batch": args.batch,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    result: dict[str, Any] = {"meta": meta, "rows": rows}
    if args.impl == "both":
        result["ratios"] = ratios(rows)
        table = markdown(rows, meta)
        print(table, flush=True)
        if args.markdown:
            Path(args.markdown).write_text(table + "\n")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
