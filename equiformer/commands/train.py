"""`equiformer train` and `equiformer test`: LightningCLI-style YAML configs.

    equiformer train --config configs/qm9/equiformer_homo.yaml [--trainer.max_epochs 3 ...]
    equiformer train --config configs/qm9/equiformer_homo.yaml --ckpt_path last     # resume
    equiformer test  --config configs/qm9/equiformer_homo.yaml --ckpt runs/.../best.ckpt

Every argument after the subcommand goes to :mod:`equiformer.tasks.cli` (a LightningCLI:
``--config``, ``--model.*``, ``--data.*``, ``--trainer.*``, ``--seed_everything``, ``--help``
lists them all), so the dispatcher's argparse does not parse them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "train a model from a YAML config / evaluate a checkpoint on the test split"


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    # The LightningCLI parser owns the arguments (dotted overrides such as --trainer.max_epochs
    # cannot be declared up front), so this subparser hands every string through untouched.
    original = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):  # noqa: ANN001 (argparse's signature)
        ns, _ = original([], namespace)  # defaults set by the dispatcher (_module, _command)
        ns.lightning_args = list(args or [])
        return ns, []

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]
    parser.epilog = (
        "All options are read by LightningCLI: run 'equiformer %s --config FILE --help' for the full list "
        "(--model.*, --data.*, --trainer.*)." % name
    )


def _is_energy_force_config(argv: list[str]) -> bool:
    """A config whose ``model:`` section holds EnergyForceTask arguments (energy/force weights)."""
    from equiformer.tasks.cli import _config_paths

    import yaml

    paths = _config_paths(argv)
    if not paths or not Path(paths[-1]).is_file():
        return False
    try:
        cfg = yaml.safe_load(Path(paths[-1]).read_text()) or {}
    except yaml.YAMLError:
        return False  # the property CLI reports the YAML error with the file name
    model = cfg.get("model") if isinstance(cfg, dict) else None
    return isinstance(model, dict) and bool({"force_weight", "energy_weight", "gradient_forces"} & set(model))


def run(args: argparse.Namespace) -> int:
    argv = list(getattr(args, "lightning_args", []) or [])
    if _is_energy_force_config(argv):  # energy + forces (configs/oc20): EnergyForceTask's LightningCLI
        import sys

        from equiformer.tasks.energy_force_cli import main as energy_force_main

        saved, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both args= and sys.argv
        try:
            return energy_force_main(["test" if args._command == "test" else "fit", *argv])
        finally:
            sys.argv = saved

    from equiformer.tasks import cli

    if args._command == "test":
        cli.test_main(argv)
    else:
        cli.train_main(argv)
    return 0
