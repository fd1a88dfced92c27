"""Tiny exported models for the tests of the hub, the Predictor, the calculator and `equiformer predict`.

The model is a real :class:`equiformer.models.equiformer.Equiformer` (one block, a few
thousand parameters, random weights) written with :func:`equiformer.hub.save_pretrained` and
QM9's real metadata (target units, free-atom references, elements), so everything downstream
of the file format runs as it does for a shipped model; only the weights are untrained.
"""

from __future__ import annotations

from pathlib import Path

import torch

from equiformer import hub

TINY_CONFIG = dict(
    preset="small",
    num_layers=1,
    irreps_node="8x0e+4x1e+2x2e",
    irreps_head="4x0e+2x1e+1x2e",
    num_heads=2,
    irreps_mlp_mid="16x0e+8x1e+4x2e",
    irreps_feature="16x0e",
    num_basis=8,
    radial_hidden=[8],
    alpha_drop=0.0,
)

#: normalisation of a plausible QM9 model (mean/std after the atomref subtraction, in eV)
NORMALIZATION = {"homo": (-6.53, 0.60), "lumo": (0.32, 1.28), "U0": (-76.1, 10.3)}


def qm9_targets(names: list[str]) -> list[dict]:
    from equiformer.datasets.qm9 import qm9_target_info

    out = []
    for n in names:
        i = qm9_target_info(n)
        out.append({"name": i.name, "unit": i.unit, "report_unit": i.report_unit,
                    "report_scale": i.report_scale, "description": i.description})
    return out


def qm9_atomref(names: list[str]) -> dict[str, dict[str, float]]:
    from equiformer.datasets.qm9 import qm9_atomref as ref

    out = {}
    for n in names:
        table = ref(n)
        if table is not None:
            out[n] = {str(z): float(v) for z, v in enumerate(table.tolist()) if v != 0.0}
    return out


def make_tiny_model(
    out_dir: Path,
    name: str = "tiny-qm9",
    targets: tuple[str, ...] = ("homo", "U0"),
    seed: int = 0,
    metrics: dict | None = None,
) -> Path:
    """Write ``<name>.safetensors`` + ``<name>.json`` (a random tiny Equiformer) into ``out_dir``."""
    from equiformer.models import build_model

    torch.manual_seed(seed)
    model = build_model("equiformer", **TINY_CONFIG, num_targets=len(targets))
    names = list(targets)
    meta = {
        "description": f"tiny untrained test model ({', '.join(names)})",
        "model": {"name": "equiformer", "config": dict(model.config)},
        "targets": qm9_targets(names),
        "normalization": {"mean": [NORMALIZATION[n][0] for n in names], "std": [NORMALIZATION[n][1] for n in names]},
        "atomref": qm9_atomref(names),
        "elements": [1, 6, 7, 8, 9],
        "domain": {"max_atoms": 29, "max_heavy_atoms": 9, "periodic": False},
        "dataset": "QM9",
        "split": {"train": 110000, "val": 10000, "test": 10831, "seed": 1},
        "metrics": metrics if metrics is not None else {"test_mae": {n: 0.5 for n in names}},
        "training": {"epochs": 0, "device": "none", "command": "tests/pretrained_helpers.py"},
    }
    return hub.save_pretrained(model, meta, out_dir, name=name)


def train_tiny_qm9_checkpoint(tmp: Path, max_steps: int, **task_kwargs):
    """A PropertyTask (tiny Equiformer; ``task_kwargs`` on top) trained ``max_steps`` steps on 200 real
    QM9 molecules (homo, U0), saved by Lightning as ``tmp/tiny.ckpt``. Returns ``(path, task in eval mode, datamodule)``."""
    import lightning.pytorch as pl

    from equiformer.tasks.datamodule import QM9DataModule
    from equiformer.tasks.property import PropertyTask

    pl.seed_everything(0, verbose=False)
    dm = QM9DataModule(root=str(tmp / "qm9"), targets=["homo", "U0"], subset=200, batch_size=16, progress=False)
    task = PropertyTask(model="equiformer", model_kwargs=TINY_CONFIG, targets=["homo", "U0"], lr=5e-3,
                        warmup_steps=1, ema_decay=0.5, **task_kwargs)
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(task, dm)
    path = tmp / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path, task.eval(), dm
