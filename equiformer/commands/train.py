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


def run(args: argparse.Namespace) -> int:
    from equiformer.tasks import cli

    argv = list(getattr(args, "lightning_args", []) or [])
    if args._command == "test":
        cli.test_main(argv)
    else:
        cli.train_main(argv)
    return 0
