"""LightningCLI for :class:`~equiformer.tasks.energy_force.EnergyForceTask` (configs in ``configs/oc20/``).

    python -m equiformer.tasks.energy_force_cli fit  --config configs/oc20/equiformer_v2_small_s2ef_trajectories.yaml
    python -m equiformer.tasks.energy_force_cli test --config configs/oc20/... --ckpt_path runs/.../last.ckpt

A config has ``model:`` (EnergyForceTask arguments), ``data:`` with ``class_path`` /
``init_args`` of a :class:`~equiformer.tasks.datamodule.StructureDataModule` subclass
(:class:`~equiformer.tasks.oc20_datamodule.OC20TrajectoryDataModule`,
:class:`~equiformer.tasks.oc20_datamodule.OC20LMDBDataModule`, ...), ``trainer:`` and
``seed_everything``; every value can be overridden on the command line
(``--trainer.max_epochs 3``, ``--data.init_args.batch_size 16``).

``--trainer.max_time`` takes Lightning's ``DD:HH:MM:SS`` or, for scripts, a bare number of seconds
(``--trainer.max_time 200``); both are normalised by :func:`normalize_max_time` before the Trainer
is built, so an over-full field such as ``00:00:00:200`` is accepted too.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from lightning.pytorch.cli import LightningCLI

from equiformer.tasks.datamodule import StructureDataModule
from equiformer.tasks.energy_force import EnergyForceTask

__all__ = ["EnergyForceCLI", "main", "max_time_string", "normalize_max_time"]

_SECONDS = re.compile(r"\d+(\.\d*)?|\.\d+")
_CLOCK = re.compile(r"\d+(:\d+){1,3}")


def max_time_string(seconds: float) -> str:
    """A wall-clock budget in seconds as Lightning's ``DD:HH:MM:SS`` (rounded up to whole seconds)."""
    if not seconds >= 0:  # also refuses NaN
        raise ValueError(f"max_time must be a non-negative number of seconds, got {seconds!r}")
    s = int(-(-float(seconds) // 1))
    return f"{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def normalize_max_time(value: Any) -> Any:
    """``trainer.max_time`` in a form Lightning's Timer accepts.

    None, ``timedelta`` and ``{"seconds": ...}``-style dicts pass through; a number or a numeric string
    is seconds; ``H:M:S``-like strings with 2-4 fields (``MM:SS``, ``HH:MM:SS``, ``DD:HH:MM:SS``, any
    field may overflow, e.g. ``00:00:00:200``) become canonical ``DD:HH:MM:SS``.
    Raises ValueError naming the value otherwise.
    """
    if value is None or isinstance(value, (timedelta, dict)):
        return value
    if isinstance(value, bool):
        raise ValueError(f"trainer.max_time: {value!r} is not a duration")
    if isinstance(value, (int, float)):
        return max_time_string(value)
    if isinstance(value, str):
        text = value.strip()
        if _SECONDS.fullmatch(text):
            return max_time_string(float(text))
        if _CLOCK.fullmatch(text):
            fields = [int(f) for f in text.split(":")]
            seconds = 0
            for f, unit in zip(reversed(fields), (1, 60, 3600, 86400)):
                seconds += f * unit
            return max_time_string(seconds)
    raise ValueError(f"trainer.max_time: {value!r} is not a duration "
                     "(give DD:HH:MM:SS, HH:MM:SS, MM:SS or a number of seconds)")


class EnergyForceCLI(LightningCLI):
    """LightningCLI with the task fixed to :class:`EnergyForceTask` and any StructureDataModule."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        super().__init__(
            EnergyForceTask,
            StructureDataModule,
            subclass_mode_data=True,
            args=None if args is None else list(args),
            run=run,
            seed_everything_default=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            **kwargs,
        )

    def before_instantiate_classes(self) -> None:
        """Normalise ``trainer.max_time`` (seconds or DD:HH:MM:SS, see :func:`normalize_max_time`)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer") if hasattr(config, "get") else None
        if trainer is not None and trainer.get("max_time") is not None:
            trainer["max_time"] = normalize_max_time(trainer["max_time"])


def main(argv: Sequence[str] | None = None) -> int:
    EnergyForceCLI(argv if argv is not None else sys.argv[1:])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
