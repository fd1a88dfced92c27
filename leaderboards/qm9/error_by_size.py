"""Test-split error of a shipped QM9 model, broken down by molecule size (heavy atoms).

QM9's size distribution is steep: 0.1 % of its molecules have 1-3 heavy atoms, 84 % have 9, and
a model trained for a few epochs fits the common sizes first. The overall test MAE then hides
much larger errors on the smallest molecules, the ones a chemist is likely to try first
(methane, water). This script measures that and, with ``--write``, records it in the model's JSON
under ``metrics.test_mae_by_heavy_atoms`` so ``equiformer predict`` can quote the error measured
for molecules of the input's size.

    python leaderboards/qm9/error_by_size.py qm9-equiformer --write
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

#: heavy-atom bins (inclusive) used for the breakdown
SIZE_BINS: tuple[tuple[int, int], ...] = ((1, 3), (4, 5), (6, 6), (7, 7), (8, 8), (9, 9))


def _bin_label(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def evaluate(name: str, batch_size: int = 256, root: str | None = None, threads: int | None = None) -> dict:
    """Per-bin test MAE (report units) and counts of the shipped model ``name`` on its QM9 test split."""
    from torch_geometric.data import Batch

    from equiformer import hub
    from equiformer.api import LoadedModel
    from equiformer.datasets.qm9 import QM9, qm9_split

    if threads:
        torch.set_num_threads(threads)
    model, meta = hub.load_pretrained(name, device="cpu")
    lm = LoadedModel(model, meta)
    split = meta.get("split") or {}
    ds = QM9(root=root) if root else QM9()
    test = qm9_split(len(ds), seed=int(split.get("seed", 1)))["test"].tolist()
    names = [t["name"] for t in lm.targets]
    cols = [ds.target_names.index(n) for n in names]
    pred, true, heavy = [], [], []
    t0 = time.perf_counter()
    for start in range(0, len(test), batch_size):
        items = [ds[i] for i in test[start:start + batch_size]]
        batch = Batch.from_data_list(items)
        with torch.no_grad():
            pred.append(lm.forward_values(batch).numpy())
        y = batch.y.to(torch.float64)[:, cols]
        true.append(y.numpy())
        heavy.append(np.array([int((d.z > 1).sum()) for d in items]))
    pred, true, heavy = np.concatenate(pred), np.concatenate(true), np.concatenate(heavy)
    err = np.abs(pred - true)
    scales = [float(t.get("report_scale", 1.0)) for t in lm.targets]
    units = [t.get("report_unit", t.get("unit")) for t in lm.targets]
    out = {"bins": [], "molecules": int(len(test)), "seconds": round(time.perf_counter() - t0, 1)}
    for lo, hi in SIZE_BINS:
        m = (heavy >= lo) & (heavy <= hi)
        row = {"heavy_atoms": _bin_label(lo, hi), "min": lo, "max": hi, "count": int(m.sum())}
        row["mae"] = {n: {"value": float(err[m, k].mean() * scales[k]) if m.any() else None, "unit": units[k]} for k, n in enumerate(names)}
        out["bins"].append(row)
    out["overall"] = {n: float(err[:, k].mean() * scales[k]) for k, n in enumerate(names)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="shipped model name or path to its .json")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--root", default=None, help="QM9 cache folder")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--write", action="store_true", help="record the breakdown in the model's JSON")
    args = p.parse_args(argv)
    res = evaluate(args.name, args.batch_size, args.root, args.threads)
    names = list(res["overall"])
    print(f"test split: {res['molecules']} molecules in {res['seconds']} s")
    print("| heavy atoms | test molecules | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for b in res["bins"]:
        vals = [b["mae"][n]["value"] for n in names]
        print(f"| {b['heavy_atoms']} | {b['count']} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in vals) + " |")
    print("| all | " + str(res["molecules"]) + " | " + " | ".join(f"{res['overall'][n]:.1f}" for n in names) + " |")
    if args.write:
        from equiformer import hub

        js, _ = hub.resolve(args.name)
        meta = json.loads(js.read_text())
        meta.setdefault("metrics", {})["test_mae_by_heavy_atoms"] = res["bins"]
        js.write_text(json.dumps(meta, indent=2) + "\n")
        print(f"wrote metrics.test_mae_by_heavy_atoms to {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
