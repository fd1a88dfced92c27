"""`equiformer train/test` sends each config to the right LightningCLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from equiformer.commands.train import _is_energy_force_config
from equiformer.tasks.cli import ConfigError, config_data_is_subclass

ROOT = Path(__file__).resolve().parents[1]


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
