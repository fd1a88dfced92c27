"""Train and evaluate n-body models at an equal step budget; print a markdown table.

    python leaderboards/nbody/run.py --models gatr transformer egnn --steps 5000 --device cuda --out results.json
    python leaderboards/nbody/run.py --steps 5000 --budget-s 330 --device cuda --out results.json  # fit a time budget

Each model is trained from its ``configs/nbody/<model>.yaml`` (command-line values override the
config: steps, batch size, data sizes, device), the checkpoint with the lowest ``val/mse`` is
kept (the paper's early stopping) and evaluated on ``test`` (in distribution), ``objects``
(5 planets instead of 3) and ``shifted`` (translated +200 along x). The "no motion" row
(final position = initial position) is the trivial reference. MSE is the mean over bodies and
coordinates of the squared position error.

``--budget-s`` (a wall-clock budget for training all models, e.g. one GPU call): every model is
first timed for ``--probe-steps`` optimizer steps (forward, backward, clipping, AdamW; after a
warm-up) and one evaluation batch; if ``--steps`` steps of every model (plus validation and
testing) do not fit the budget, all models get the same smaller number of steps (a multiple of
100, validation every fifth of it), so the comparison stays at equal steps. The probe and the
decision are stored under ``"budget"`` in the JSON. Each model also gets a hard ``max_time``
(twice its planned time + 30 s, cut so that all models end by ``--deadline-s``, default 1.25 x the budget) so a bad
estimate cannot overrun the call; a model stopped by it has ``steps < planned_steps``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator

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
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock seconds for training + evaluating all models; scales --steps down (equally) if needed")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="with --budget-s: seconds after start by which every model stops training (default 1.25 x budget)")
    p.add_argument("--probe-steps", type=int, default=20, help="timed steps per model for --budget-s")
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


@contextlib.contextmanager
def full_fp32_matmuls() -> Iterator[None]:
    """Temporarily turn off TF32 for float32 matmuls and convolutions (``"highest"`` precision)."""
    prev = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev[0])
        torch.backends.cudnn.allow_tf32 = prev[1]


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
    if getattr(args, "max_time_s", None):
        trainer_kw["max_time"] = {"seconds": float(args.max_time_s[name])}
    trainer = L.Trainer(**trainer_kw, accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
                        default_root_dir=str(run_dir), callbacks=[ckpt], logger=CSVLogger(str(run_dir), name="csv"),
                        enable_progress_bar=False, enable_model_summary=False)
    t0 = time.perf_counter()
    trainer.fit(task, datamodule=dm)
    train_s = time.perf_counter() - t0
    best = ckpt.best_model_path or None
    # Test in full float32: TF32 matmuls (10-bit mantissa, used for training on GPUs) turn GATr's
    # exact translation equivariance into errors of ~1e-4 in MSE for systems at x = +200, whose
    # embedded points carry coordinates of that size (measured with TF32 rounding emulated on CPU).
    with full_fp32_matmuls():
        results = trainer.test(task, datamodule=dm, ckpt_path=best if best else None, verbose=False)
    metrics = {}
    for r in results:
        metrics.update({k: float(v) for k, v in r.items()})
    row = {
        "model": name,
        "model_kwargs": dict(task.hparams.model_kwargs),
        "parameters": sum(p.numel() for p in task.model.parameters()),
        "steps": int(trainer.global_step),
        "planned_steps": int(cfg["trainer"]["max_steps"]),
        "train_size": dm.sizes["train"],
        "train_seconds": round(train_s, 1),
        "data_seconds": round(t_data, 1),
        "test_matmul_precision": "highest",
        "best_val_mse": float(ckpt.best_model_score) if ckpt.best_model_score is not None else None,
        "best_checkpoint": best,
        **{f"{s}_mse": metrics.get(f"{s}/mse") for s in SETS},
    }
    return row, dm


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def probe(name: str, args: argparse.Namespace, warmup: int = 5) -> dict[str, float]:
    """Seconds per training step (forward, backward, clipping, AdamW) and per evaluation batch of ``name``."""
    from equiformer.tasks.nbody import NBodyDataModule, NBodyTask

    cfg = _config(name, args)
    dm = NBodyDataModule(**cfg["data"])
    dm.prepare_data()  # generates (and caches) every split the runs will use
    dm.setup("fit")
    device = torch.device(args.device)
    task = NBodyTask(**cfg["model"]).to(device)
    opt = torch.optim.AdamW(task.parameters(), lr=cfg["model"].get("lr", 3e-4))
    clip = float(cfg["trainer"].get("gradient_clip_val") or 0.0)
    train = [b.to(device) for _, b in zip(range(warmup + args.probe_steps), iter(dm.train_dataloader()))]
    while len(train) < warmup + args.probe_steps:  # tiny training sets: reuse batches
        train.extend(train[: warmup + args.probe_steps - len(train)])
    val = next(iter(dm.val_dataloader())).to(device)

    def step(batch) -> None:
        loss = task._mse(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(task.parameters(), clip)
        opt.step()

    for b in train[:warmup]:
        step(b)
    _sync(args.device)
    t0 = time.perf_counter()
    for b in train[warmup:]:
        step(b)
    _sync(args.device)
    step_s = (time.perf_counter() - t0) / args.probe_steps
    task.eval()
    with torch.no_grad():
        task._mse(val)
        _sync(args.device)
        t0 = time.perf_counter()
        for _ in range(3):
            task._mse(val)
        _sync(args.device)
    eval_s = (time.perf_counter() - t0) / 3
    del task, opt
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"step_s": step_s, "eval_batch_s": eval_s}


#: Lightning's per-step bookkeeping (logging, callbacks, scheduler) on top of the bare step
LIGHTNING_OVERHEAD = 1.15
#: the models together stop training (Lightning max_time) by this multiple of --budget-s
HARD_LIMIT = 1.25
#: fixed seconds per model: trainer set-up, checkpoint writing, data loading, test set-up
FIXED_S = 8.0


def plan_steps(args: argparse.Namespace) -> dict[str, Any]:
    """Probe every model and choose a common step count that fits ``args.budget_s`` (see module docstring)."""
    requested = args.steps or int(yaml.safe_load((Path(args.config_dir) / f"{args.models[0]}.yaml").read_text())
                                  ["trainer"]["max_steps"])
    probes, t_probe = {}, time.perf_counter()
    for name in args.models:
        probes[name] = probe(name, args)
        print(f"probe {name}: {1e3 * probes[name]['step_s']:.1f} ms/step, "
              f"{1e3 * probes[name]['eval_batch_s']:.1f} ms/eval batch", flush=True)
    probe_s = time.perf_counter() - t_probe
    cfg0 = _config(args.models[0], args)["data"]
    eval_batches = math.ceil(cfg0["val_size"] / cfg0["eval_batch_size"])
    test_batches = 3 * math.ceil(cfg0["test_size"] / cfg0["eval_batch_size"])

    def planned(name: str, steps: int) -> float:
        p = probes[name]
        n_val = 5 + 1  # five validations (every fifth of the run) + the sanity check
        return (FIXED_S + LIGHTNING_OVERHEAD * steps * p["step_s"]
                + p["eval_batch_s"] * (n_val * eval_batches + test_batches))

    budget = args.budget_s - probe_s
    steps = requested
    if sum(planned(n, steps) for n in args.models) > budget:
        per_step = sum(LIGHTNING_OVERHEAD * probes[n]["step_s"] for n in args.models)
        fixed = sum(planned(n, 0) for n in args.models)
        steps = max(100, int((budget - fixed) / per_step) // 100 * 100) if requested >= 100 else requested
        steps = min(steps, requested)
    plan = {
        "budget_s": args.budget_s, "probe_s": round(probe_s, 1), "requested_steps": requested, "steps": steps,
        "scaled": steps < requested, "probe": probes,
        "planned_s": {n: round(planned(n, steps), 1) for n in args.models},
    }
    print(f"plan: {steps} steps (requested {requested}); planned seconds {plan['planned_s']}", flush=True)
    return plan


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
    plan = None
    if args.budget_s:
        plan = plan_steps(args)
        if plan["scaled"]:
            args.val_every = max(1, plan["steps"] // 5)
        args.steps = plan["steps"]
        deadline = time.perf_counter() - plan["probe_s"] + (args.deadline_s or HARD_LIMIT * args.budget_s)
    rows, no_motion = [], None
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
           "python": platform.python_version()}
    for k, name in enumerate(args.models):
        if plan is not None:  # hard stop: 2x the plan, never past the deadline minus the later models' plans
            later = sum(plan["planned_s"][n] for n in args.models[k + 1:])
            left = deadline - time.perf_counter() - later
            args.max_time_s = {name: max(min(2.0 * plan["planned_s"][name] + 30.0, left), 0.5 * plan["planned_s"][name])}
        try:
            row, dm = run_model(name, args)
        except (FileNotFoundError, ValueError) as e:
            print(f"run.py: error: {e}", file=sys.stderr)
            return 2
        rows.append(row)
        if no_motion is None:
            no_motion = no_motion_mse(dm)
        print(json.dumps(row), flush=True)
        table = markdown_table(rows, no_motion)
        out = {"rows": rows, "no_motion": no_motion, "paper_mse": PAPER_MSE, "env": env, "args": vars(args),
               "budget": plan, "table": table}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))  # after every model: a late failure keeps the rest
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
