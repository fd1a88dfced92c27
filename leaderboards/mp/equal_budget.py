"""Crystal models at an equal wall-clock budget on one GPU: Materials Project e_form and gap.

Used for the table in ``leaderboards/mp/README.md``. iComFormer and Crystalformer (ours) and
CGCNN (peer, :mod:`leaderboards.mp.peer_cgcnn`) each train alone on the GPU, one after the
other, for the same number of seconds per target, on the same data: the MP structures of the
offline ``flla_2015`` table with the official MP-2018.6.1 split (MEGNet / jarvis-leaderboard
``megnet_e_form`` / ``megnet_gappbe``) restricted to those ids: **3,418 train / 265 val / 226
test**, labels from the split files (MP-2018.6.1 values). The papers train on the full 60,000.

Every model is trained by :class:`~equiformer.tasks.property.PropertyTask` (standardised
target, AdamW, 5 % linear warm-up from lr/25 + cosine to 1e-6, no EMA, fp32 with TF32 matmuls)
with its own paper recipe's peak learning rate, loss, weight decay, batch size and gradient
clipping (:data:`MODELS`). The budget becomes a number of optimiser steps: a short probe
measures the model's training throughput, and the cosine is laid over exactly the steps that
fit, so every model finishes its schedule inside its budget (a time guard stops it otherwise).
The checkpoint with the best validation MAE is tested on the test split.

After each target, the model with the lowest validation MAE among those that ship with the
package (Crystalformer, iComFormer; CGCNN lives here, outside the package) is exported as a
shipped model (``--export-dir``): ``mp-eform`` and ``mp-gap``. Weights above
``--half-above-mib`` (iComFormer's 19.6 MB) are rounded to float16 before testing and stored as
float16, so the test MAE recorded is that of the shipped weights.

    python leaderboards/mp/equal_budget.py --models crystalformer icomformer cgcnn --targets e_form gap \\
        --budget-s 70 --out results/ --export-dir results/pretrained
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # for `leaderboards.*`; an installed equiformer keeps precedence

#: name -> registry name (or module:Class), model kwargs, recipe (paper values, see README)
MODELS: dict[str, dict[str, Any]] = {
    "crystalformer": {"model": "crystalformer", "kwargs": {"preset": "default"}, "small": {"preset": "small"},
                      "lr": 5e-4, "betas": (0.9, 0.98), "weight_decay": 1e-5, "loss": "l1", "batch_size": 128,
                      "clip": 1.0, "ships": True},
    "icomformer": {"model": "icomformer", "kwargs": {"preset": "mp"}, "small": {"preset": "tiny"},
                   "lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 1e-5, "loss": "mse", "batch_size": 64,
                   "clip": None, "ships": True},
    "cgcnn": {"model": "leaderboards.mp.peer_cgcnn:CGCNN", "kwargs": {}, "small": {"atom_features": 16, "hidden": 32},
              "lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0, "loss": "l1", "batch_size": 64,
              "clip": None, "ships": False},
}
DATASETS = {"e_form": "mp_e_form", "gap": "mp_gap"}
SHIPPED_NAMES = {"e_form": "mp-eform", "gap": "mp-gap"}
#: test MAE of the papers (full MP-2018.6.1: 60,000 training structures, 500 epochs), target units
PAPER_MAE = {
    "icomformer": {"e_form": 0.0183, "gap": 0.193, "source": "Yan et al., ICLR 2024, Table 1"},
    "crystalformer": {"e_form": 0.0186, "gap": 0.198, "source": "Taniai et al., ICLR 2024, Table 2"},
    "cgcnn": {"e_form": 0.031, "gap": 0.292, "source": "CGCNN on MP-2018.6.1 as tabulated by Matformer / ComFormer"},
}


def make_timer_callback(skip: int):
    from equiformer.tasks.throughput import ThroughputTimer

    return ThroughputTimer(skip=skip)


def register(model: str) -> str:
    """Registry name of ``MODELS[model]`` (registers ``module:Class`` peers under ``model``)."""
    from equiformer.models import MODEL_REGISTRY, register_model

    target = MODELS[model]["model"]
    if ":" in target:
        if model not in MODEL_REGISTRY:
            register_model(model, target)
        return model
    return target


def build(args: argparse.Namespace, model: str, target: str, total_steps: int | None):
    from equiformer.tasks.crystal_datamodule import CrystalDataModule
    from equiformer.tasks.property import PropertyTask

    spec = MODELS[model]
    kwargs = dict(spec["small"] if args.small else spec["kwargs"])
    dm = CrystalDataModule(
        dataset=DATASETS[target], targets=[target], source="flla_2015", split="official", root=args.root,
        data_dir=args.data_dir, batch_size=spec["batch_size"], eval_batch_size=256, num_workers=args.num_workers,
        pin_memory=torch.cuda.is_available(), subset=args.subset, progress=False,
    )
    lr = spec["lr"]
    warmup = max(1, int(0.05 * total_steps)) if total_steps else 5
    task = PropertyTask(
        model=register(model), model_kwargs=kwargs, targets=[target], lr=lr, weight_decay=spec["weight_decay"],
        betas=spec["betas"], warmup_steps=warmup, warmup_start_lr=lr / 25, min_lr=1e-6, ema_decay=None,
        loss=spec["loss"],
    )
    return dm, task


def _mae_from(metrics: dict[str, float], stage: str, target: str, scale: float) -> float | None:
    """A target's logged MAE (report unit) converted to the target's unit."""
    for k, v in metrics.items():
        if k.startswith(f"{stage}/{target}_mae_"):
            return float(v) / scale
    return None


def read_curve(metrics_csv: Path, target: str, scale: float, steps_per_epoch: float) -> list[dict[str, float]]:
    """Validation points ``[{"step", "epoch", "val_mae"}]`` (target unit) from a CSVLogger file."""
    if not metrics_csv.exists():
        return []
    out = []
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            key = next((k for k in row if k.startswith(f"val/{target}_mae_")), None)
            if key and row.get(key):
                step = int(float(row.get("step") or 0))
                out.append({"step": step, "epoch": round(step / steps_per_epoch, 3), "val_mae": float(row[key]) / scale})
    return out


def round_checkpoint_to_half(src: Path, dst: Path) -> None:
    """Copy a Lightning checkpoint with every floating state_dict tensor rounded to float16 values."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["state_dict"] = {k: (v.half().to(v.dtype) if v.is_floating_point() else v) for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, dst)


def store_half(js: Path) -> None:
    """Rewrite a shipped model's safetensors in float16 (values already float16-exact) and update its JSON."""
    import hashlib

    from safetensors.torch import load_file, save_file

    meta = json.loads(js.read_text())
    st = js.with_name(meta["weights"]["file"])
    tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(st)).items()}
    save_file(tensors, str(st), metadata={"format": "pt", "equiformer_model": meta["name"]})
    meta["weights"]["sha256"] = hashlib.sha256(st.read_bytes()).hexdigest()
    meta["weights"]["dtype"] = "float16"
    js.write_text(json.dumps(meta, indent=2) + "\n")


def fill_graph_cache(args: argparse.Namespace, dm: Any, task: Any, tag: str) -> float:
    """Build the per-structure graphs of the train and val splits into the model's cache (models
    with a ``lattice_cache``: iComFormer), in ``--num-workers`` processes; returns the seconds taken.

    Runs before the probe and counts in the budget; without it the probe would time the first
    pass (graph search + lattice frames, ~3-6 ms per structure on the host) and plan too few steps
    for the cached epochs that follow."""
    cache = getattr(task.model, "lattice_cache", None)
    if cache is None:
        return 0.0
    from equiformer.graph.crystal import fill_graph_cache as fill

    t0 = time.perf_counter()
    added = sum(fill(dm.split_dataset(split), cache, task.model.graph_options(), num_workers=args.num_workers)
                for split in ("train", "val"))
    seconds = time.perf_counter() - t0
    print(f"[{tag}] graph cache: {added} structures in {seconds:.1f} s ({args.num_workers} workers)", flush=True)
    return seconds


def run_one(args: argparse.Namespace, model: str, target: str, budget_s: float) -> dict[str, Any]:
    """Probe, train for ``budget_s`` seconds, validate and test one model on one target."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    spec = MODELS[model]
    tag = f"{model}_{target}"
    t_start = time.perf_counter()
    common = dict(precision="32-true", enable_progress_bar=False, enable_model_summary=False,
                  gradient_clip_val=spec["clip"], gradient_clip_algorithm="norm" if spec["clip"] else None)
    probe_cache, graph_s = None, 0.0
    if args.steps is None:
        L.seed_everything(0, workers=True)
        dm, task = build(args, model, target, total_steps=None)
        graph_s = fill_graph_cache(args, dm, task, tag)
        timer = make_timer_callback(skip=3)
        L.Trainer(max_steps=args.probe_steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                  callbacks=[timer], **common).fit(task, datamodule=dm)
        # iComFormer memoises per-structure graphs (host work); the training run keeps the filled cache
        probe_cache = getattr(task.model, "lattice_cache", None)
        probe_s = time.perf_counter() - t_start
        rate = timer.graphs_per_s
        sizes = dm.split_sizes()
        seconds_per_step = spec["batch_size"] / rate
        left = budget_s - probe_s
        eval_s = args.evals * (sizes["val"] / (3.0 * rate) + 0.3)
        steps = max(10, int((left - eval_s) / seconds_per_step))
        print(f"[{tag}] probe: {rate:.0f} structures/s, {probe_s:.1f} s; training {steps} steps = "
              f"{steps * spec['batch_size'] / sizes['train']:.1f} epochs", flush=True)
    else:
        steps, rate, probe_s = args.steps, float("nan"), 0.0
        left = budget_s

    L.seed_everything(0, workers=True)
    dm, task = build(args, model, target, total_steps=steps)
    if probe_cache is not None:
        task.model.lattice_cache = probe_cache
    ckpt_dir = args.work / "ckpt" / tag
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, monitor="val/mae_norm", mode="min", save_last=False, filename="best")
    timer = make_timer_callback(skip=3)
    logger = CSVLogger(args.work / "logs", name=tag, version=0)
    trainer = L.Trainer(
        max_steps=steps, max_epochs=-1, val_check_interval=max(1, steps // args.evals), check_val_every_n_epoch=None,
        callbacks=[ckpt, timer], logger=logger, log_every_n_steps=20,
        max_time={"seconds": max(5, int(left + args.grace_s))} if math.isfinite(left) else None, **common,
    )
    t_train = time.perf_counter()
    trainer.fit(task, datamodule=dm)
    train_s = time.perf_counter() - t_train
    done = int(trainer.global_step)
    info = dm.target_infos[0]
    sizes = dm.split_sizes()
    steps_per_epoch = sizes["train"] / spec["batch_size"]
    curve = read_curve(Path(logger.log_dir) / "metrics.csv", target, info.report_scale, steps_per_epoch)
    val = trainer.validate(task, datamodule=dm, ckpt_path="best", verbose=False)[0]
    test = trainer.test(task, datamodule=dm, ckpt_path="best", verbose=False)[0]
    n_params = sum(p.numel() for p in task.model.parameters())
    elements = sorted({int(z) for z in dm.crystals.z[torch.isin(
        torch.repeat_interleave(torch.arange(len(dm.crystals)), dm.crystals.num_atoms), dm.splits["train"])].tolist()})
    result = {
        "model": model, "target": target, "unit": info.unit, "parameters": n_params,
        "weights_mib_fp32": round(sum(v.numel() * 4 for v in task.model.state_dict().values()) / 2**20, 2),
        "config": dict(task.model.config), "recipe": {k: spec[k] for k in ("lr", "betas", "weight_decay", "loss", "batch_size", "clip")},
        "budget_s": budget_s if math.isfinite(budget_s) else None, "probe_s": round(probe_s, 2), "graph_cache_s": round(graph_s, 2), "train_s": round(train_s, 2), "wall_s": round(time.perf_counter() - t_start, 2),
        "steps": done, "planned_steps": steps, "epochs": round(done / steps_per_epoch, 3), "batch_size": spec["batch_size"],
        "structures_per_s_probe": round(rate, 1), "structures_per_s_train": round(timer.graphs_per_s, 1),
        "split": sizes, "val_mae": _mae_from(val, "val", target, info.report_scale),
        "test_mae": _mae_from(test, "test", target, info.report_scale),
        "best_checkpoint": str(ckpt.best_model_path), "curve": curve,
        "elements": elements,
    }
    print(f"[{tag}] {done} steps ({result['epochs']:.1f} epochs) in {train_s:.0f} s, {result['structures_per_s_train']:.0f} "
          f"structures/s; val MAE {result['val_mae']:.4f} {info.unit}, test MAE {result['test_mae']:.4f} {info.unit}", flush=True)
    return result


def export_best(args: argparse.Namespace, target: str, runs: list[dict[str, Any]], device: str) -> dict[str, Any] | None:
    """Export the shippable run with the lowest validation MAE for ``target``; returns its summary."""
    import lightning as L

    from equiformer.hub import export_from_lightning

    done = [r for r in runs if r["target"] == target and "error" not in r and MODELS[r["model"]]["ships"]
            and r.get("val_mae") is not None]
    if not done:
        return None
    best = min(done, key=lambda r: r["val_mae"])
    model, ckpt = best["model"], Path(best["best_checkpoint"])
    test_mae = best["test_mae"]
    half = best["weights_mib_fp32"] > args.half_above_mib
    if half:  # round to float16 and test the rounded weights: that MAE is the shipped model's
        rounded = ckpt.with_name("best_fp16.ckpt")
        round_checkpoint_to_half(ckpt, rounded)
        dm, task = build(args, model, target, total_steps=None)
        res = L.Trainer(precision="32-true", logger=False, enable_progress_bar=False,
                        enable_model_summary=False).test(task, datamodule=dm, ckpt_path=str(rounded), verbose=False)[0]
        test_mae = _mae_from(res, "test", target, dm.target_infos[0].report_scale)
        ckpt = rounded
    name = SHIPPED_NAMES[target]
    what = {"e_form": "formation energy per atom (eV/atom)", "gap": "PBE band gap (eV)"}[target]
    desc = args.note + (f"{model} ({best['parameters'] / 1e6:.2f}M parameters) for the Materials Project {what}; trained "
            f"{best['train_s']:.0f} s ({best['epochs']:.1f} epochs) on {device} on only {best['split']['train']:,} MP "
            f"structures (flla_2015 rows in the official MP-2018.6.1 split; the papers use 60,000)"
            + (", weights stored in float16" if half else "")
            + ". Chosen by validation MAE among the shippable models of leaderboards/mp.")
    js = export_from_lightning(
        ckpt, name, args.export_dir, metrics={"test_mae": {target: test_mae}, "val_mae": {target: best["val_mae"]}},
        training={"epochs": best["epochs"], "steps": best["steps"], "wall_time_s": best["train_s"], "device": device,
                  "budget_s": best["budget_s"], "command": args.command},
        description=desc, dataset="Materials Project (MP-2018.6.1 labels, flla_2015 structures)",
        split={**best["split"], "protocol": "MEGNet MP-2018.6.1 official split, restricted to flla_2015 ids"},
        elements=best["elements"], domain={"periodic": True},
    )
    if half:
        store_half(js)
    print(f"exported {js} ({model}, test MAE {test_mae:.4f})", flush=True)
    return {"name": name, "model": model, "test_mae": test_mae, "val_mae": best["val_mae"], "float16": half,
            "files": [js.name, js.with_suffix(".safetensors").name]}


def write_outputs(out: Path, summary: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "target", "step", "epoch", "val_mae", "unit"])
        for r in summary["runs"]:
            for p in r.get("curve", []):
                w.writerow([r["model"], r["target"], p["step"], p["epoch"], f"{p['val_mae']:.6g}", r.get("unit", "")])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["crystalformer", "icomformer", "cgcnn"])
    p.add_argument("--targets", nargs="+", choices=sorted(DATASETS), default=["e_form", "gap"])
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock seconds per model and target (probe + training)")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps (no probe)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="skip runs that would end later than this many seconds after the start")
    p.add_argument("--probe-steps", type=int, default=25)
    p.add_argument("--evals", type=int, default=10, help="validation passes during training")
    p.add_argument("--grace-s", type=float, default=5.0, help="time guard beyond the planned training time")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--root", default=None, help="processed-tensor cache folder of the MP structures")
    p.add_argument("--data-dir", default=None, help="shared data folder (materials_project/megnet_splits/)")
    p.add_argument("--subset", type=int, default=None, help="first N structures only (smoke runs)")
    p.add_argument("--small", action="store_true", help="small presets (CPU smoke runs)")
    p.add_argument("--out", type=Path, required=True, help="results.json and curves.csv")
    p.add_argument("--work", type=Path, default=Path("/tmp/mp_equal_budget"), help="checkpoints and logs")
    p.add_argument("--export-dir", type=Path, default=None, help="export the best shippable model per target here")
    p.add_argument("--half-above-mib", type=float, default=15.0, help="store exported weights in float16 above this size")
    p.add_argument("--note", default="", help="text put before the exported models' descriptions")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if (args.budget_s is None) == (args.steps is None):
        p.error("give exactly one of --budget-s and --steps")
    args.command = "python leaderboards/mp/equal_budget.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    summary: dict[str, Any] = {
        "device": device, "torch": torch.__version__, "budget_s": args.budget_s, "steps": args.steps, "small": args.small,
        "subset": args.subset, "command": args.command, "paper_test_mae": PAPER_MAE,
        "note": "training set: 3,418 MP structures (flla_2015 rows in the official MP-2018.6.1 split); the papers train on 60,000",
        "runs": [], "shipped": {},
    }
    for target in args.targets:
        for model in args.models:
            elapsed = time.perf_counter() - t0
            budget = args.budget_s if args.budget_s is not None else float("inf")
            if args.deadline_s is not None and elapsed + (budget if args.budget_s else 0) + 15 > args.deadline_s:
                print(f"[{model}_{target}] skipped: {elapsed:.0f} s used, deadline {args.deadline_s:.0f} s", flush=True)
                summary["runs"].append({"model": model, "target": target, "error": "skipped: deadline"})
                continue
            try:
                r = run_one(args, model, target, budget)
            except Exception as exc:  # noqa: BLE001 - one failing model must not lose the others' results
                traceback.print_exc()
                r = {"model": model, "target": target, "error": f"{type(exc).__name__}: {exc}"}
            finally:
                if torch.cuda.is_available():
                    r_mem = torch.cuda.max_memory_allocated() / 2**30
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
            if torch.cuda.is_available():
                r["peak_gpu_mem_gib"] = round(r_mem, 2)
            summary["runs"].append(r)
            write_outputs(args.out, summary)
        if args.export_dir is not None:
            try:
                shipped = export_best(args, target, summary["runs"], device)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                shipped = {"error": f"{type(exc).__name__}: {exc}"}
            summary["shipped"][target] = shipped
        write_outputs(args.out, summary)
    summary["total_s"] = round(time.perf_counter() - t0, 1)
    write_outputs(args.out, summary)
    print(json.dumps([{k: r.get(k) for k in ("model", "target", "epochs", "structures_per_s_train", "val_mae", "test_mae", "error")}
                      for r in summary["runs"]], indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
