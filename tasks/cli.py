"""LightningCLI wiring of :class:`PropertyTask` + :class:`QM9DataModule` for `equiformer train/test`.

A config is a LightningCLI YAML with the sections ``model:`` (PropertyTask arguments),
``data:`` (QM9DataModule arguments; ``data.targets`` also sets the task's targets),
``trainer:`` (``lightning.pytorch.Trainer`` arguments), ``seed_everything`` and, optionally,
``float32_matmul_precision`` (``"high"`` enables TF32 matmuls on GPUs). Any value can be
overridden on the command line (``--trainer.max_epochs 3``, ``--data.batch_size 64``).

Outputs go under ``trainer.default_root_dir``:

- ``checkpoints/best-<epoch>.ckpt`` (lowest ``val/mae_norm``) and ``checkpoints/last.ckpt``;
- ``csv/version_<k>/metrics.csv`` and ``config.yaml`` (the full resolved config),
  ``tensorboard/version_<k>/`` event files.

Resume exactly where a run stopped (optimizer, schedule, EMA, epoch counter) with
``--ckpt_path last`` (that directory's ``checkpoints/last.ckpt``), ``--ckpt_path PATH`` or
``--resume PATH``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from equiformer.datasets.qm9 import resolve_qm9_targets
from equiformer.tasks.datamodule import QM9DataModule, StructureDataModule
from equiformer.tasks.property import PropertyTask

__all__ = ["ConfigError", "EquiformerCLI", "train_main", "test_main", "resolve_checkpoint", "CHECKPOINT_DIR", "MONITOR"]

#: checkpoint folder under ``trainer.default_root_dir``
CHECKPOINT_DIR = "checkpoints"
#: metric that selects the best checkpoint (mean over targets of MAE / std; lower is better)
MONITOR = "val/mae_norm"
_MATMUL_PRECISIONS = ("highest", "high", "medium")


class ConfigError(ValueError):
    """A config file or command-line value that cannot be used (the message names it)."""


def _config_paths(argv: Sequence[str]) -> list[str]:
    out = []
    for i, a in enumerate(argv):
        if a in ("--config", "-c") and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith("--config="):
            out.append(a.split("=", 1)[1])
    return out


def _check_config_files(argv: Sequence[str]) -> list[str]:
    paths = _config_paths(argv)
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ConfigError(f"config file {p!r} does not exist (looked in {path.resolve().parent})")
        if path.is_dir():
            raise ConfigError(f"config {p!r} is a directory; give a YAML file such as configs/qm9/equiformer_homo.yaml")
    return paths


def config_data_is_subclass(argv: Sequence[str]) -> bool:
    """True when the (last) config's ``data:`` section names its class (``class_path``).

    QM9 configs give QM9DataModule arguments directly; other datasets (crystals, OC20) name a
    :class:`StructureDataModule` subclass with ``class_path`` / ``init_args``.
    """
    import yaml

    paths = _config_paths(argv)
    if not paths:
        return False
    try:
        cfg = yaml.safe_load(Path(paths[-1]).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"config {paths[-1]!r} cannot be read as YAML: {exc}") from None
    data = cfg.get("data") if isinstance(cfg, dict) else None
    return isinstance(data, dict) and "class_path" in data


def _target_list(targets: Any) -> list[str]:
    if isinstance(targets, str):
        return [t.strip() for t in targets.split(",") if t.strip()]
    return [str(t) for t in targets]


class EquiformerCLI(LightningCLI):
    """LightningCLI for property prediction; builds model, datamodule and trainer, runs nothing.

    With ``subclass_data=True`` the ``data:`` section names any :class:`StructureDataModule`
    subclass (``class_path``/``init_args``), e.g. ``equiformer.tasks.crystal_datamodule.CrystalDataModule``.
    """

    def __init__(self, args: Sequence[str], subcommand: str = "train", subclass_data: bool = False) -> None:
        self._equiformer_subcommand = subcommand
        self._subclass_data = subclass_data
        super().__init__(
            PropertyTask,
            StructureDataModule if subclass_data else QM9DataModule,
            subclass_mode_data=subclass_data,
            args=list(args),
            run=False,
            seed_everything_default=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False, "prog": f"equiformer {subcommand}",
                           "description": "Train (or test) a property-prediction model from a YAML config."},
            auto_configure_optimizers=False,
            load_from_checkpoint_support=False,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        if self._subclass_data:
            parser.link_arguments("data.init_args.targets", "model.targets", compute_fn=_target_list)
        else:
            parser.link_arguments("data.targets", "model.targets", compute_fn=resolve_qm9_targets)
        parser.add_argument("--float32_matmul_precision", type=str | None, default=None,
                            help="torch.set_float32_matmul_precision: 'highest', 'high' (TF32 on GPUs) or 'medium'")
        if self._equiformer_subcommand == "train":
            parser.add_argument("--ckpt_path", type=str | None, default=None,
                                help="resume from this checkpoint; 'last' = <default_root_dir>/checkpoints/last.ckpt")
            parser.add_argument("--resume", type=str | None, default=None, help="same as --ckpt_path")
        else:
            parser.add_argument("--ckpt", type=str | None, default=None,
                                help="checkpoint to evaluate; 'best'/'last' look in <default_root_dir>/checkpoints")
            parser.add_argument("--ckpt_path", type=str | None, default=None, help="same as --ckpt")
            parser.add_argument("--split", type=str, default="test", help="'test' (default) or 'val'")

    def before_instantiate_classes(self) -> None:
        # canonical target names for both sides ("u0" -> "U0", "homo,lumo" -> [...]) so that the
        # task's and the datamodule's logged hyper-parameters agree
        data = self.config.get("data")
        if not self._subclass_data and data is not None and data.get("targets") is not None:
            data["targets"] = resolve_qm9_targets(data["targets"])

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Trainer with our default loggers (CSV + TensorBoard) and callbacks (best/last checkpoints, rich bar)."""
        extra_callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        root = Path(config.get("default_root_dir") or ".")
        config["default_root_dir"] = str(root)
        if config.get("logger") in (None, True):
            from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

            config["logger"] = [CSVLogger(str(root), name="csv"), TensorBoardLogger(str(root), name="tensorboard")]
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if config.get("enable_checkpointing", True) is not False and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(ModelCheckpoint(dirpath=str(root / CHECKPOINT_DIR), filename="best-{epoch:03d}",
                                             monitor=MONITOR, mode="min", save_top_k=1, save_last=True,
                                             auto_insert_metric_name=False))
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            try:
                from lightning.pytorch.callbacks import RichProgressBar

                callbacks.append(RichProgressBar())
            except (ImportError, ModuleNotFoundError):  # rich missing: Lightning's default tqdm bar
                pass
        config["callbacks"] = callbacks
        return self._instantiate_trainer(config, extra_callbacks)


def _build(argv: Sequence[str], subcommand: str) -> EquiformerCLI | None:
    """Parse and instantiate; ``None`` when ``--help``/``--print_config`` was answered."""
    from jsonargparse import ArgumentError

    paths = _check_config_files(argv)
    where = f"config {paths[-1]!r}" if paths else "command line"
    saved_argv = sys.argv
    sys.argv = sys.argv[:1]  # LightningCLI warns when it sees both args= and a command line
    try:
        return EquiformerCLI(argv, subcommand, subclass_data=config_data_is_subclass(argv))
    except SystemExit as exc:  # --help, --print_config
        if exc.code in (0, None):
            return None
        raise ConfigError(f"{where}: invalid arguments (see messages above)") from None
    except ArgumentError as exc:
        msg = str(exc).strip().splitlines()
        raise ConfigError(f"{where}: {' '.join(m.strip() for m in msg)}") from None
    except ValueError as exc:  # e.g. an unknown target name from the datamodule
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from None
    finally:
        sys.argv = saved_argv


def _apply_matmul_precision(cli: EquiformerCLI) -> None:
    prec = cli.config.get("float32_matmul_precision")
    if prec is None:
        return
    if prec not in _MATMUL_PRECISIONS:
        raise ConfigError(f"float32_matmul_precision must be one of {list(_MATMUL_PRECISIONS)}, got {prec!r}")
    torch.set_float32_matmul_precision(prec)


def resolve_checkpoint(path: str | None, root: str | Path | None, purpose: str = "resume") -> str | None:
    """``'last'``/``'best'`` -> the file under ``<root>/checkpoints``; a path must exist."""
    if path is None:
        return None
    ckdir = Path(root or ".") / CHECKPOINT_DIR
    if path == "last":
        p = ckdir / "last.ckpt"
        if not p.exists():
            raise ConfigError(f"--ckpt_path last: no {p} to {purpose} from (trainer.default_root_dir is {root or '.'!s})")
        return str(p)
    if path == "best":
        found = sorted(ckdir.glob("best*.ckpt"), key=lambda q: q.stat().st_mtime)
        if not found:
            raise ConfigError(f"'best': no best*.ckpt in {ckdir}")
        return str(found[-1])
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint {path!r} does not exist")
    return path


def train_main(argv: Sequence[str]) -> dict[str, Any] | None:
    """``equiformer train``: fit, then print where the best/last checkpoints are and their val MAEs."""
    cli = _build(argv, "train")
    if cli is None:
        return None
    _apply_matmul_precision(cli)
    cfg = cli.config
    if cfg.get("resume") and cfg.get("ckpt_path") and cfg["resume"] != cfg["ckpt_path"]:
        raise ConfigError("give either --resume or --ckpt_path, not both")
    ckpt = resolve_checkpoint(cfg.get("resume") or cfg.get("ckpt_path"), cli.trainer.default_root_dir)
    trainer = cli.trainer
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    summary: dict[str, Any] = {"metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}}
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            summary["best_checkpoint"] = cb.best_model_path or None
            summary["last_checkpoint"] = cb.last_model_path or None
            break
    if trainer.is_global_zero:
        lines = [f"equiformer train: finished {trainer.current_epoch} epoch(s), {trainer.global_step} steps"]
        for k, v in sorted(summary["metrics"].items()):
            lines.append(f"  {k:<28s} {v:.6g}")
        if summary.get("best_checkpoint"):
            lines.append(f"  best checkpoint: {summary['best_checkpoint']}")
        if summary.get("last_checkpoint"):
            lines.append(f"  last checkpoint: {summary['last_checkpoint']}")
        print("\n".join(lines))
    return summary


def _format_mae_table(results: dict[str, float], task: PropertyTask, split: str, n: int | None, ckpt: str) -> str:
    from equiformer.tasks.metrics import mae_key

    head = f"equiformer test: {split} MAE of {ckpt}" + (f" on {n} molecules" if n else "")
    lines = [head, f"  {'target':<8s} {'MAE':>12s}  unit"]
    for name in task.targets:
        info = task.target_info.get(name, {})
        unit = info.get("report_unit", info.get("unit", ""))
        key = f"{split}/{mae_key(name, unit)}"
        if key in results:
            lines.append(f"  {name:<8s} {results[key]:>12.5g}  {unit}")
    return "\n".join(lines)


def test_main(argv: Sequence[str]) -> dict[str, float] | None:
    """``equiformer test``: evaluate a checkpoint (EMA weights when kept) on the test split; print MAEs."""
    cli = _build(argv, "test")
    if cli is None:
        return None
    _apply_matmul_precision(cli)
    cfg = cli.config
    given = cfg.get("ckpt") or cfg.get("ckpt_path")
    if not given:
        raise ConfigError("equiformer test needs --ckpt PATH (or 'best'/'last' under trainer.default_root_dir)")
    ckpt = resolve_checkpoint(given, cli.trainer.default_root_dir, purpose="test")
    split = cfg.get("split", "test")
    if split not in ("test", "val"):
        raise ConfigError(f"--split must be 'test' or 'val', got {split!r}")
    try:
        task = PropertyTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (any failure to read the file -> one clear line)
        raise ConfigError(f"checkpoint {ckpt!r} cannot be loaded as a PropertyTask: {exc}") from None
    dm = cli.datamodule
    dm_targets = [str(t) for t in getattr(dm, "target_names", task.targets)]
    if dm_targets != task.targets:
        raise ConfigError(f"checkpoint {ckpt!r} predicts {task.targets} but the data config selects {dm_targets}; "
                          "pass the config the model was trained with (or --data.targets)")
    trainer = cli.trainer
    if split == "test":
        out = trainer.test(task, datamodule=dm, verbose=False)
    else:
        out = trainer.validate(task, datamodule=dm, verbose=False)
    results = {k: float(v) for d in out for k, v in d.items()}
    n = task.eval_counts.get(split)
    if trainer.is_global_zero:
        print(_format_mae_table(results, task, split, n, ckpt))
        sys.stdout.flush()
    return results
