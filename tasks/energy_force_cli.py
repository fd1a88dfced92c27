"""LightningCLI for :class:`~equiformer.tasks.energy_force.EnergyForceTask` (configs in ``configs/oc20/``).

    python -m equiformer.tasks.energy_force_cli fit  --config configs/oc20/equiformer_v2_small_s2ef_trajectories.yaml
    python -m equiformer.tasks.energy_force_cli test --config configs/oc20/... --ckpt_path runs/.../last.ckpt

A config has ``model:`` (EnergyForceTask arguments), ``data:`` with ``class_path`` /
``init_args`` of a :class:`~equiformer.tasks.datamodule.StructureDataModule` subclass
(:class:`~equiformer.tasks.oc20_datamodule.OC20TrajectoryDataModule`,
:class:`~equiformer.tasks.oc20_datamodule.OC20LMDBDataModule`, ...), ``trainer:`` and
``seed_everything``; every value can be overridden on the command line
(``--trainer.max_epochs 3``, ``--data.init_args.batch_size 16``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LightningCLI

from equiformer.tasks.datamodule import StructureDataModule
from equiformer.tasks.energy_force import EnergyForceTask

__all__ = ["EnergyForceCLI", "main"]


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


def main(argv: Sequence[str] | None = None) -> int:
    EnergyForceCLI(argv if argv is not None else sys.argv[1:])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
