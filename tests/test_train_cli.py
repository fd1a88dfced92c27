"""`equiformer train` / `equiformer test` through the real dispatcher (equiformer.cli.main) and configs."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("jsonargparse")

from equiformer.cli import main  # noqa: E402
from equiformer.tasks import cli as task_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "qm9"
SMOKE = str(CONFIGS / "equiformer_small_smoke.yaml")
QM9_TARGETS = ["mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "Cv"]


pytestmark = pytest.mark.usefixtures("one_thread_module")


def _quick(root: Path, qm9_root: str) -> list[str]:
    """Overrides that keep the smoke run to a few batches on one CPU core."""
    return ["--trainer.default_root_dir", str(root), "--data.root", qm9_root,
            "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--trainer.log_every_n_steps", "1"]


def test_train_test_and_resume_smoke_config(tmp_path, qm9_root, capsys):
    root = tmp_path / "run"
    rc = main(["train", "--config", SMOKE, "--trainer.max_epochs", "1", *_quick(root, qm9_root)])
    out = capsys.readouterr().out
    assert rc == 0
    last, best = root / "checkpoints" / "last.ckpt", list((root / "checkpoints").glob("best-*.ckpt"))
    assert last.is_file() and len(best) == 1
    assert "best checkpoint:" in out and "val/homo_mae_meV" in out

    # logs: metrics.csv has the per-target MAE in meV, the learning rate and the throughput
    (metrics_csv,) = (root / "csv").glob("version_*/metrics.csv")
    header = next(csv.reader(metrics_csv.open()))
    for col in ("val/homo_mae_meV", "val/loss", "val/mae_norm", "train/lr", "train/molecules_per_s"):
        assert col in header
    assert list((root / "tensorboard").glob("version_*/events.out.tfevents.*"))
    assert (metrics_csv.parent / "config.yaml").is_file()

    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 3
    hp = ckpt["hyper_parameters"]
    assert hp["targets"] == ["homo"] and hp["model_kwargs"]["preset"] == "small" and hp["ema_decay"] == 0.999

    # equiformer test on the checkpoint prints the MAE in meV
    rc = main(["test", "--config", SMOKE, "--ckpt", str(last), *_quick(root, qm9_root)])
    out = capsys.readouterr().out
    assert rc == 0
    m = re.search(r"^\s*homo\s+([0-9.eE+-]+)\s+meV\s*$", out, re.M)
    assert m, out
    assert 0.0 < float(m.group(1)) < 1e5
    assert "test MAE of" in out and "on 64 molecules" in out  # one eval batch of 64

    # resume: 'last' continues the same run for a second epoch (optimizer/schedule/EMA restored)
    rc = main(["train", "--config", SMOKE, "--trainer.max_epochs", "2", "--ckpt_path", "last", *_quick(root, qm9_root)])
    assert rc == 0, capsys.readouterr().err
    ckpt2 = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt2["global_step"] == 6 and ckpt2["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 2
    assert int(ckpt2["state_dict"]["ema.num_updates"]) == 6
    assert ckpt2["lr_schedulers"][0]["last_epoch"] == 6


def test_missing_config_file_is_a_clear_error(tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    assert main(["train", "--config", missing]) == 2
    err = capsys.readouterr().err
    assert "equiformer train: error:" in err and "nope.yaml" in err and "does not exist" in err
    with pytest.raises(ValueError, match="does not exist"):
        task_cli.train_main(["--config", missing])
    assert main(["test", "--config", missing, "--ckpt", "x.ckpt"]) == 2


def test_bad_values_are_clear_errors(tmp_path, qm9_root, capsys):
    args = ["--config", SMOKE, "--trainer.default_root_dir", str(tmp_path)]
    assert main(["train", *args, "--data.targets", "[homoo]"]) == 2
    err = capsys.readouterr().err
    assert "homoo" in err and "equiformer_small_smoke.yaml" in err
    assert main(["train", *args, "--trainer.max_epochs", "many"]) == 2
    assert "max_epochs" in capsys.readouterr().err
    assert main(["train", *args, "--ckpt_path", "last"]) == 2  # nothing to resume from yet
    assert "last.ckpt" in capsys.readouterr().err
    assert main(["test", *args]) == 2
    assert "--ckpt" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lr: [oops\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "bad.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_parses(path, capsys):
    assert task_cli.train_main(["--config", str(path), "--print_config"]) is None
    out = capsys.readouterr().out
    assert "model_kwargs:" in out and "max_epochs:" in out


def test_configs_cover_all_qm9_targets():
    import yaml

    seen = {}
    for path in CONFIGS.glob("equiformer_*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        seen[path.stem] = cfg["data"]["targets"]
    singles = {t[0] for name, t in seen.items() if len(t) == 1 and "smoke" not in name}
    assert singles == set(QM9_TARGETS)
    assert seen["equiformer_homo_lumo_gap_u0"] == ["homo", "lumo", "gap", "U0"]
    homo = yaml.safe_load((CONFIGS / "equiformer_homo.yaml").read_text())
    assert homo["model"]["lr"] == 5e-4 and homo["model"]["weight_decay"] == 5e-3 and homo["model"]["loss"] == "l1"
    assert homo["data"]["batch_size"] == 128 and homo["trainer"]["max_epochs"] == 300
    assert homo["model"]["warmup_epochs"] == 5


def test_target_names_are_canonical_on_both_sides(tmp_path):
    cli = task_cli._build(["--config", SMOKE, "--data.targets", "u0,HOMO", "--trainer.default_root_dir", str(tmp_path),
                           "--model.model_kwargs", '{"preset": "small", "num_layers": 1}'], "train")
    assert cli.model.targets == ["U0", "homo"] == cli.datamodule.target_names
    assert cli.model.hparams_initial["targets"] == cli.datamodule.hparams_initial["targets"]
    assert cli.model.model.config["num_targets"] == 2 and cli.model.model.config["num_layers"] == 1
