"""Train and evaluate n-body models at an equal step budget; print a markdown table.

    python leaderboards/nbody/run.py --models gatr transformer egnn --steps 5000 --device cuda --out results.json

Each model is trained from its ``configs/nbody/<model>.yaml`` (command-line values override the
config: steps, batch size, data sizes, device), the checkpoint with the lowest ``val/mse`` is
kept (the paper's early stopping) and evaluated on ``test`` (in distribution), ``objects``
(5 planets instead of 3) and ``shifted`` (translated +200 along x). The "no motion" row
(final position = initial position) is the trivial reference. MSE is the mean over bodies and
coordinates of the squared position error.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs" / "nbody"
#: the GATr paper's eval MSE at 1 % of the training data and 5,000 steps (ANCHORS.md)
PAPER_MSE = {"gatr": 0.0005, "segnn": 0.0006, "se3_transformer": 0.0025, "transformer": 0.0050, "mlp": 0.0776}
SETS = ("test", "objects", "shifted")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["gatr", "transformer", "egnn"])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's, 5000)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default="results.json", help="JSON with every metric")
    p.add_argument("--config-dir", default=str(CONFIG_DIR))
    p.add_argument("--root", default=None, help="folder of generated data (default: the cache)")
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--eval-size", type=int, default=None, help="systems in val, test, objects, shifted each")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--val-every", type=int, default=None, help="validate every N steps (default: the config's)")
    p.add_argument("--model-kwargs", default=None, help='JSON overriding every model\'s kwargs, e.g. \'{"num_blocks": 2}\'')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--run-dir", default="runs/nbody", help="checkpoints and CSV logs")
    return p.parse_args(argv)


def _config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    path = Path(args.config_dir) / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no config for model {name!r}: {path} does not exist")
    cfg = yaml.safe_load(path.read_text())
    data, trainer, model = cfg.setdefault("data", {}), cfg.setdefault("trainer", {}), cfg.setdefault("model", {})
    if args.steps is not None:
        trainer["max_steps"] = args.steps
    if args.val_every is not None:
        trainer["val_check_interval"] = args.val_every
    trainer["val_check_interval"] = min(int(trainer.get("val_check_interval", 1000)), int(trainer["max_steps"]))
    if args.train_size is not None:
        data["train_size"] = args.train_size
    if args.eval_size is not None:
        for k in ("val_size", "test_size", "generalization_size"):
            data[k] = args.eval_size
    if args.batch_size is not None:
        data["batch_size"] = args.batch_size
    if args.root is not None:
        data["root"] = args.root
    if args.model_kwargs:
        model["model_kwargs"] = {**model.get("model_kwargs", {}), **json.loads(args.model_kwargs)}
    data["seed"] = args.seed
    if args.device.startswith("cuda"):
        data["generate_device"] = "cuda"
    return cfg


def no_motion_mse(dm) -> dict[str, float]:
    """MSE of predicting the initial positions (the trivial baseline) on each evaluation set."""
    return {s: float(((dm.split(s).pos_final.double() - dm.split(s).pos.double()) ** 2).mean()) for s in SETS}


def run_model(name: str, args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from equiformer.tasks.nbody import NBodyDataModule, NBodyTask

    cfg = _config(name, args)
    L.seed_everything(args.seed, workers=True, verbose=False)
    dm = NBodyDataModule(**cfg["data"])
    t_data = time.perf_counter()
    dm.prepare_data()
    t_data = time.perf_counter() - t_data
    task = NBodyTask(**cfg["model"])
    trainer_kw = {k: v for k, v in cfg["trainer"].items() if k not in ("default_root_dir", "accelerator", "devices")}
    run_dir = Path(args.run_dir) / name
    ckpt = ModelCheckpoint(dirpath=run_dir / "checkpoints", monitor="val/mse", mode="min", save_top_k=1,
                           filename="best-{step}")
    trainer = L.Trainer(**trainer_kw, accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
                        default_root_dir=str(run_dir), callbacks=[ckpt], logger=CSVLogger(str(run_dir), name="csv"),
                        enable_progress_bar=False, enable_model_summary=False)
    t0 = time.perf_counter()
    trainer.fit(task, datamodule=dm)
    train_s = time.perf_counter() - t0
    best = ckpt.best_model_path or None
    results = trainer.test(task, datamodule=dm, ckpt_path=best if best else None, verbose=False)
    metrics = {}
    for r in results:
        metrics.update({k: float(v) for k, v in r.items()})
    row = {
        "model": name,
        "model_kwargs": dict(task.hparams.model_kwargs),
        "parameters": sum(p.numel() for p in task.model.parameters()),
        "steps": int(trainer.global_step),
        "train_size": dm.sizes["train"],
        "train_seconds": round(train_s, 1),
        "data_seconds": round(t_data, 1),
        "best_val_mse": float(ckpt.best_model_score) if ckpt.best_model_score is not None else None,
        "best_checkpoint": best,
        **{f"{s}_mse": metrics.get(f"{s}/mse") for s in SETS},
    }
    return row, dm


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.2e}" if abs(x) < 1e-3 or abs(x) >= 100 else f"{x:.4f}"


def markdown_table(rows: list[dict[str, Any]], no_motion: dict[str, float] | None) -> str:
    lines = [
        "| model | params | steps | train systems | test MSE | objects MSE | shifted MSE | paper test MSE | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {r['steps']} | {r['train_size']} | {_fmt(r['test_mse'])} | "
            f"{_fmt(r['objects_mse'])} | {_fmt(r['shifted_mse'])} | {_fmt(PAPER_MSE.get(r['model']))} | {r['train_seconds']} |"
        )
    if no_motion:
        lines.append(f"| no motion (x_T = x_0) | 0 | – | – | {_fmt(no_motion['test'])} | {_fmt(no_motion['objects'])} | "
                     f"{_fmt(no_motion['shifted'])} | – | – |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("run.py: error: --device cuda but no CUDA device is visible", file=sys.stderr)
            return 2
        torch.set_float32_matmul_precision("high")
    rows, no_motion = [], None
    for name in args.models:
        try:
            row, dm = run_model(name, args)
        except (FileNotFoundError, ValueError) as e:
            print(f"run.py: error: {e}", file=sys.stderr)
            return 2
        rows.append(row)
        if no_motion is None:
            no_motion = no_motion_mse(dm)
        print(json.dumps(row), flush=True)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
           "python": platform.python_version()}
    table = markdown_table(rows, no_motion)
    out = {"rows": rows, "no_motion": no_motion, "paper_mse": PAPER_MSE, "env": env, "args": vars(args), "table": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
