"""EquiformerV2 speed and memory: one training step (forward, energy + force loss, backward) and inference.

    python benchmarks/bench_equiformer_v2.py --device cuda --presets 31M 153M --batch 8 --out eqv2.json
    python benchmarks/bench_equiformer_v2.py --device cpu --presets small --batch 1 --threads 1   # smoke test

Structures are OC20-like adsorbate+slab systems built in numpy (no ASE needed): an fcc Cu(100)
slab of ``--cells`` x ``--cells`` x ``--layers`` conventional cells (4 atoms each) with ``--adsorbates``
light atoms (O, C, H, N) 1.8-2.4 Å above the top layer, positions rattled by 0.05 Å, periodic in
all three directions with 15 Å of vacuum (as fairchem treats OC20 slabs). The default 3 x 3 x 2 + 4
gives 76 atoms, close to OC20's average of 77.8.

Reported per preset and precision: median ms per step over ``--repeats`` after ``--warmup``,
structures per second, edges per structure, peak CUDA memory. ``--amp bf16`` runs the model under
bf16 autocast. The paper (V100, fp16 AMP) reports 7.1 training structures/GPU-s for 31M and 1.8 for 153M.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Batch

from equiformer.data.contract import make_data
from equiformer.models.equiformer_v2 import EquiformerV2


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


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.allow_tf32 = not args.no_tf32
    batch = Batch.from_data_list([slab(i, args.cells, args.layers, args.adsorbates) for i in range(args.batch)]).to(device)
    rows = []
    for preset in args.presets:
        torch.manual_seed(0)
        kwargs: dict[str, Any] = {"preset": preset}
        if args.direct_forces is not None:
            kwargs["direct_forces"] = args.direct_forces == "yes"
        model = EquiformerV2(**kwargs).to(device)
        params = sum(p.numel() for p in model.parameters())
        edges = model.edges(batch)[0].shape[1]
        for amp in args.amp:
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")
            row: dict[str, Any] = {
                "preset": preset,
                "params": params,
                "amp": amp,
                "batch": args.batch,
                "atoms_per_structure": batch.num_nodes / args.batch,
                "edges_per_structure": edges / args.batch,
                "direct_forces": model.direct_forces,
            }

            def train_step() -> None:
                model.train()
                with autocast:
                    out = model(batch)
                loss = out["energy"].float().abs().mean() + out["forces"].float().pow(2).sum(-1).sqrt().mean()
                loss.backward()
                model.zero_grad(set_to_none=True)

            def infer() -> None:
                model.eval()
                grad = torch.enable_grad() if not model.direct_forces else torch.no_grad()
                with grad, autocast:
                    model(batch)

            for name, fn in (("train", train_step), ("infer", infer)):
                try:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    times = _time(fn, device, args.warmup, args.repeats)
                    ms = 1000 * statistics.median(times)
                    row[f"{name}_ms"] = round(ms, 2)
                    row[f"{name}_structures_per_s"] = round(args.batch / (ms / 1000), 2)
                    if device.type == "cuda":
                        row[f"{name}_peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                except torch.cuda.OutOfMemoryError:
                    row[f"{name}_ms"] = "OOM"
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--presets", nargs="+", default=["31M", "153M"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cells", type=int, default=3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--adsorbates", type=int, default=4)
    p.add_argument("--amp", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--direct-forces", choices=["yes", "no"], default=None, help="override the preset's force head")
    p.add_argument("--no-tf32", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = run(args)
    meta = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor(),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
