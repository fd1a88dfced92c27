"""`equiformer train/test` sends each config to the right LightningCLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from equiformer.commands.train import _is_energy_force_config
from equiformer.tasks.cli import ConfigError, config_data_is_subclass

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EQUIFORMER_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "oc20").glob("*.yaml")), ids=lambda p: p.name)
def test_oc20_configs_go_to_the_energy_force_task(path):
    assert _is_energy_force_config(["--config", str(path)])
    assert config_data_is_subclass(["--config", str(path)])


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "qm9").glob("*.yaml")), ids=lambda p: p.name)
def test_qm9_configs_go_to_the_property_task_with_qm9_data(path):
    assert not _is_energy_force_config(["--config", str(path)])
    assert not config_data_is_subclass(["--config", str(path)])


def test_unreadable_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        config_data_is_subclass(["--config", str(bad)])


def test_crystal_config_trains_through_equiformer_train(tmp_path, capsys):
    """A `class_path` data section (CrystalDataModule) runs in LightningCLI's subclass mode."""
    from equiformer.cli import main

    if not (SHARED / "materials_project" / "flla_2015.csv").is_file():
        pytest.skip(f"shared MP structures not found under {SHARED}")

    code = main([
        "train", "--config", str(ROOT / "configs" / "mp" / "crystalformer_e_form.yaml"),
        "--data.init_args.source", "flla_2015", "--data.init_args.subset", "60",
        "--data.init_args.root", str(tmp_path / "cache"), "--data.init_args.num_workers", "0",
        "--data.init_args.pin_memory", "false", "--data.init_args.batch_size", "8",
        "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "false",
    ])
    out = capsys.readouterr().out
    assert code == 0 and "val/e_form_mae_meV_atom" in out
