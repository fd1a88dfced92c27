"""Train a QM9 model for a fixed wall-clock budget on one GPU, then evaluate on the test split.

Used for the side-by-side table in ``leaderboards/qm9/README.md``: Equiformer (ours) and
TorchMD-NET's equivariant transformer (peer) get the same split (Equiformer's seed-1
110,000 / 10,000 / 10,831), the same task (:class:`~equiformer.tasks.property.PropertyTask`:
targets standardised after subtracting free-atom energies, extensive ones (U0) per atom with
``--normalize auto``, the default, L1 loss, AdamW, linear warm-up + cosine, EMA of weights),
the same batch size and the same GPU time. Each keeps the learning
rate of its own paper recipe (Equiformer 5e-4, TorchMD-NET ET 4e-4).

The budget becomes a number of optimiser steps: a short probe measures the model's training
throughput first, and the cosine schedule is laid over exactly the steps that fit, so both
models finish their schedule inside the same time.

    python leaderboards/qm9/equal_budget.py --model equiformer --budget-s 480 --out results/
    python leaderboards/qm9/equal_budget.py --model torchmdnet_et --budget-s 480 --out results/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # for `leaderboards.*`; an installed equiformer keeps precedence

MODELS = {
    # name: (registry name or module:Class, model kwargs, peak lr)
    "equiformer": ("equiformer", {"preset": "qm9"}, 5e-4),
    "torchmdnet_et": ("leaderboards.qm9.peer_torchmdnet:TorchMDNetET", {}, 4e-4),
}


def make_timer_callback(skip: int):
    from equiformer.tasks.throughput import ThroughputTimer

    return ThroughputTimer(skip=skip)


def build(args: argparse.Namespace, total_steps: int | None):
    from equiformer.models import register_model
    from equiformer.tasks.datamodule import QM9DataModule
    from equiformer.tasks.property import PropertyTask

    target, kwargs, lr = MODELS[args.model]
    name = args.model
    if ":" in target:
        register_model(name, target)
    else:
        name = target
    kwargs = dict(kwargs)
    if args.preset and args.model == "equiformer":
        kwargs["preset"] = args.preset
    dm = QM9DataModule(
        root=args.root, targets=[t.strip() for t in args.targets.split(",")], batch_size=args.batch_size, eval_batch_size=256,
        num_workers=args.num_workers, pin_memory=True, split_seed=1, progress=False,
    )
    warmup = max(1, int(0.05 * total_steps)) if total_steps else 10
    task = PropertyTask(
        model=name, model_kwargs=kwargs, targets=list(dm.target_names), lr=args.lr or lr,
        weight_decay=args.weight_decay, warmup_steps=warmup, warmup_start_lr=1e-6, min_lr=1e-6,
        ema_decay=args.ema_decay, loss="l1", normalize=args.normalize,
    )
    return dm, task


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--preset", default=None, help="Equiformer preset (default: the paper's QM9 model)")
    p.add_argument("--targets", default="homo,lumo,gap,U0")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock seconds for probe + training")
    p.add_argument("--probe-steps", type=int, default=40)
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps (no probe)")
    p.add_argument("--max-time-s", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=5e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--normalize", choices=["auto", "per_molecule", "per_atom"], default="auto",
                   help="target standardisation for both models: 'auto' (default) per atom for extensive targets "
                        "(U0), per molecule for the others; 'per_molecule' as the runs before this option")
    p.add_argument("--num-workers", type=int, default=6)
    p.add_argument("--evals", type=int, default=4, help="validation passes during training")
    p.add_argument("--root", default=None, help="QM9 cache folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ckpt-dir", type=Path, default=None, help="checkpoints (default: OUT/<model>_ckpt)")
    p.add_argument("--export", default=None, help="export the best checkpoint as this shipped-model name")
    args = p.parse_args(argv)
    if (args.budget_s is None) == (args.steps is None):
        p.error("give exactly one of --budget-s and --steps")

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from equiformer.datasets.qm9 import QM9_SPLIT_SIZES

    torch.set_float32_matmul_precision("highest")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    t_start = time.perf_counter()

    if args.steps is None:
        # 1. probe: training throughput of this model on this GPU
        L.seed_everything(0, workers=True)
        dm, task = build(args, total_steps=None)
        timer = make_timer_callback(skip=5)
        L.Trainer(
            max_steps=args.probe_steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], precision="32-true",
        ).fit(task, datamodule=dm)
        probe_s = time.perf_counter() - t_start
        rate = timer.graphs_per_s
        n_params = sum(p.numel() for p in task.model.parameters())
        print(f"[{args.model}] probe: {rate:.0f} molecules/s, {n_params/1e6:.2f} M parameters, {probe_s:.0f} s", flush=True)

        # 2. the steps that fit: training + `evals` validation passes (validation ~3x faster per molecule)
        left = args.budget_s - probe_s
        train_molecules = dm.split_sizes()["train"]
        val_molecules = dm.split_sizes()["val"]
        seconds_per_step = args.batch_size / rate
        eval_s = args.evals * val_molecules / (3.0 * rate)
        steps = max(10, int((left - eval_s) / seconds_per_step))
        print(f"[{args.model}] training {steps} steps = {steps * args.batch_size / train_molecules:.2f} epochs", flush=True)

    else:  # a fixed number of steps, e.g. for CPU runs whose throughput a short probe misjudges
        steps, rate, probe_s = args.steps, float("nan"), 0.0
        train_molecules = QM9_SPLIT_SIZES["train"]

    # 3. train with the schedule laid over exactly those steps
    L.seed_everything(0, workers=True)
    dm, task = build(args, total_steps=steps)
    ckpt = ModelCheckpoint(dirpath=args.ckpt_dir or args.out / f"{args.model}_ckpt", monitor="val/mae_norm", mode="min",
                           save_last=True, filename="best")
    timer = make_timer_callback(skip=5)
    trainer = L.Trainer(
        max_steps=steps, max_epochs=-1, val_check_interval=max(1, steps // args.evals),
        check_val_every_n_epoch=None, callbacks=[ckpt, timer], precision="32-true",
        logger=CSVLogger(args.out, name=f"{args.model}_logs"), enable_progress_bar=False,
        log_every_n_steps=50,
        max_time=None if args.max_time_s is None else {"seconds": int(args.max_time_s)},
    )
    t_train = time.perf_counter()
    trainer.fit(task, datamodule=dm)
    train_s = time.perf_counter() - t_train
    done = int(trainer.global_step)  # fewer than `steps` when --max-time-s stopped the run
    val = trainer.validate(task, datamodule=dm, ckpt_path="best", verbose=False)[0]
    test = trainer.test(task, datamodule=dm, ckpt_path="best", verbose=False)[0]

    result = {
        "model": args.model, "device": device, "parameters": sum(p.numel() for p in task.model.parameters()), "targets": list(dm.target_names),
        "budget_s": args.budget_s, "probe_s": probe_s, "train_s": train_s, "steps": done, "planned_steps": steps,
        "epochs": done * args.batch_size / train_molecules, "batch_size": args.batch_size,
        "normalize": args.normalize, "normalization_modes": dict(zip(task.targets, task.normalization_modes)),
        "molecules_per_s_probe": rate, "molecules_per_s_train": timer.graphs_per_s,
        "val": {k: float(v) for k, v in val.items()}, "test": {k: float(v) for k, v in test.items()},
        "command": "python leaderboards/qm9/equal_budget.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
    }
    (args.out / f"{args.model}_result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2), flush=True)

    if args.export:
        from equiformer.hub import export_from_lightning

        path = export_from_lightning(
            ckpt.best_model_path, args.export, args.out, metrics=test,
            training={"epochs": round(result["epochs"], 3), "steps": done, "planned_steps": steps, "wall_time_s": round(train_s, 1),
                      "device": device, "command": result["command"]},
        )
        print(f"exported {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
