"""Shipped-model format (equiformer.hub): export from a real Lightning checkpoint, safe loading,
refusal of weights that do not match their config, the registry, and the shipped models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

from equiformer import hub
from equiformer.data import from_smiles
from pretrained_helpers import TINY_CONFIG, make_tiny_model, train_tiny_qm9_checkpoint

torch.set_num_threads(1)

HAS_QM9 = importlib.util.find_spec("qm9pack") is not None
SMILES = ["O", "C", "CCO", "c1ccncc1", "FC(F)F", "CC(=O)N"]


def _batch(smiles=SMILES) -> Batch:
    return Batch.from_data_list([from_smiles(s) for s in smiles])


# --------------------------------------------------------------------------- a real Lightning checkpoint


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    """A PropertyTask (tiny Equiformer, EMA on) trained 4 steps on real QM9 molecules, saved by Lightning."""
    if not HAS_QM9:
        pytest.skip("qm9pack not installed")
    return train_tiny_qm9_checkpoint(tmp_path_factory.mktemp("ckpt"), max_steps=4)


def test_lightning_checkpoint_loads_without_pickled_code(lightning_ckpt):
    path, _, _ = lightning_ckpt
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # raises on any non-allowlisted type
    hp = ckpt["hyper_parameters"]
    assert hp["model"] == "equiformer" and hp["targets"] == ["homo", "U0"]
    json.dumps(hp)  # plain types only


def test_export_round_trip_reproduces_the_task(lightning_ckpt, tmp_path):
    path, task, _ = lightning_ckpt
    js = hub.export_from_lightning(path, "tiny-qm9", tmp_path, metrics={"test_mae": {"homo": 0.25, "U0": 1.5}},
                                   training={"device": "cpu", "command": "pytest"})
    assert js == tmp_path / "tiny-qm9.json" and (tmp_path / "tiny-qm9.safetensors").exists()
    meta = json.loads(js.read_text())
    assert meta["name"] == "tiny-qm9" and meta["dataset"] == "QM9" and meta["elements"] == [1, 6, 7, 8, 9]
    assert meta["model"]["name"] == "equiformer" and meta["model"]["config"]["irreps_node"] == TINY_CONFIG["irreps_node"]
    assert [t["name"] for t in meta["targets"]] == ["homo", "U0"] and [t["unit"] for t in meta["targets"]] == ["eV", "eV"]
    assert meta["split"]["seed"] == 1 and meta["split"]["subset"] == 200
    assert sum(meta["split"][k] for k in ("train", "val", "test")) == 200
    assert set(meta["atomref"]) == {"U0"} and set(meta["atomref"]["U0"]) == {"1", "6", "7", "8", "9"}
    assert meta["metrics"]["test_mae"]["homo"] == {"value": 0.25, "unit": "eV"}
    assert meta["training"]["global_step"] == 4 and meta["weights"]["ema"] is True
    assert meta["equiformer_version"] and meta["license"]

    # the task's own de-normalised predictions (EMA weights) == the loaded model + metadata
    from equiformer.api import Predictor

    batch = _batch()
    expected = task.predict_properties(batch).numpy()
    model, meta2 = hub.load_pretrained(js)
    got = Predictor([(model, meta2)], device="cpu").predict(SMILES)
    assert list(got.columns) == ["input", "formula", "homo (eV)", "U0 (eV)"]
    np.testing.assert_allclose(got[["homo (eV)", "U0 (eV)"]].to_numpy(), expected, rtol=1e-6, atol=1e-4)


def test_export_takes_the_ema_weights(lightning_ckpt, tmp_path):
    path, task, _ = lightning_ckpt
    js = hub.export_from_lightning(path, "ema", tmp_path)
    model, _ = hub.load_pretrained(js)
    sd = model.state_dict()
    ema, raw = task.ema.module.state_dict(), task.model.state_dict()
    assert all(torch.equal(sd[k], ema[k].float()) for k in sd)
    assert any(not torch.equal(sd[k], raw[k].float()) for k in sd)  # 4 steps moved the raw weights away
    # the command-line form, with the dict trainer.test() returns as metrics
    (tmp_path / "m.json").write_text(json.dumps([{"test/loss": 0.2, "test/homo_mae_meV": 15.1, "test/U0_mae_meV": 6.6}]))
    assert hub.main(["export", str(path), "--name", "raw", "--out", str(tmp_path), "--metrics", str(tmp_path / "m.json"),
                     "--no-ema"]) == 0
    js_raw = tmp_path / "raw.json"
    assert json.loads(js_raw.read_text())["metrics"] == {"test_mae": {"homo": {"value": 15.1, "unit": "meV"},
                                                                      "U0": {"value": 6.6, "unit": "meV"}}}
    raw_model, raw_meta = hub.load_pretrained(js_raw)
    assert raw_meta["weights"]["ema"] is False
    assert all(torch.equal(raw_model.state_dict()[k], raw[k].float()) for k in sd)


# --------------------------------------------------------------------------- file format and its checks


def test_round_trip_outputs_are_identical(tmp_path):
    js = make_tiny_model(tmp_path)
    from equiformer.models import build_model

    torch.manual_seed(0)
    original = build_model("equiformer", **TINY_CONFIG, num_targets=2).eval()
    model, meta = hub.load_pretrained(js)
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(original(batch)["y"], model(batch)["y"])
    assert not model.training and meta["name"] == "tiny-qm9" and meta["_path"] == str(js)
    # the same model by name through $EQUIFORMER_MODELS, and by its .safetensors path
    m2, _ = hub.load_pretrained(tmp_path / "tiny-qm9.safetensors")
    with torch.no_grad():
        assert torch.equal(m2(batch)["y"], model(batch)["y"])


def test_loading_never_unpickles(tmp_path, monkeypatch):
    js = make_tiny_model(tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("load_pretrained must not call torch.load / pickle")

    monkeypatch.setattr(torch, "load", forbidden)
    import pickle

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    hub.load_pretrained(js)


def _edit_json(js: Path, edit) -> None:
    meta = json.loads(js.read_text())
    edit(meta)
    js.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["model"]["config"].update(irreps_node="8x0e+4x1e+4x2e"), "shape mismatch"),
        (lambda m: m["model"]["config"].update(num_layers=2), "missing"),
        (lambda m: m["model"]["config"].update(num_targets=3), "shape mismatch"),
        (lambda m: m["model"]["config"].update(attention="dot_product"), "do not match"),
    ],
)
def test_weights_that_do_not_match_the_config_are_refused(tmp_path, edit, message):
    js = make_tiny_model(tmp_path)
    _edit_json(js, edit)
    with pytest.raises(hub.PretrainedError, match=message) as err:
        hub.load_pretrained(js)
    assert "tiny-qm9.safetensors" in str(err.value) and "weights do not match the model config" in str(err.value)


def test_changed_or_broken_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    js = make_tiny_model(tmp_path)
    st = js.with_suffix(".safetensors")
    tensors = load_file(str(st))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(st))
    with pytest.raises(hub.PretrainedError, match="checksum"):
        hub.load_pretrained(js)
    hub.load_pretrained(js, verify_hash=False)  # same names and shapes: loads when asked to skip the check
    del tensors[key]
    save_file(tensors, str(st))
    with pytest.raises(hub.PretrainedError, match=f"missing 1: {key}"):
        hub.load_pretrained(js, verify_hash=False)
    st.write_bytes(b"not a safetensors file")
    with pytest.raises(hub.PretrainedError, match="not a readable safetensors file"):
        hub.load_pretrained(js, verify_hash=False)


def test_bad_metadata_is_refused(tmp_path):
    js = make_tiny_model(tmp_path)
    _edit_json(js, lambda m: m["normalization"].update(std=[1.0]))
    with pytest.raises(hub.PretrainedError, match="one number per target"):
        hub.load_pretrained(js)
    _edit_json(js, lambda m: m.pop("targets"))
    with pytest.raises(hub.PretrainedError, match="missing field 'targets'"):
        hub.load_pretrained(js)
    js.write_text("{not json")
    with pytest.raises(hub.PretrainedError, match="not a readable model description"):
        hub.load_pretrained(js)
    js2 = make_tiny_model(tmp_path, name="other")
    _edit_json(js2, lambda m: m["model"].update(name="no-such-model"))
    with pytest.raises(hub.PretrainedError, match="unknown model 'no-such-model'"):
        hub.load_pretrained(js2)


def test_missing_files_and_unknown_names(tmp_path, monkeypatch):
    monkeypatch.setenv(hub.ENV_DIRS, str(tmp_path))
    js = make_tiny_model(tmp_path)
    js.with_suffix(".safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="tiny-qm9.safetensors"):
        hub.load_pretrained(js)
    with pytest.raises(hub.PretrainedError, match="no pretrained model named 'nope'; available"):
        hub.load_pretrained("nope")


def test_registry_lists_models_with_their_test_mae(tmp_path, monkeypatch):
    monkeypatch.setenv(hub.ENV_DIRS, str(tmp_path))
    make_tiny_model(tmp_path, name="fam-homo", targets=("homo",), metrics={"test_mae": {"homo": 0.0151}})
    make_tiny_model(tmp_path, name="fam-u0", targets=("U0",))
    (tmp_path / "orphan.json").write_text("{}")  # no weights next to it: not listed
    listed = {m["name"]: m for m in hub.available_models()}
    assert {"fam-homo", "fam-u0"} <= set(listed) and "orphan" not in listed
    assert listed["fam-homo"]["test_mae"] == {"homo": {"value": 0.0151, "unit": "eV"}}
    assert listed["fam-homo"]["targets"] == ["homo"] and listed["fam-homo"]["dataset"] == "QM9"
    assert hub.format_mae(hub.read_metadata(listed["fam-homo"]["path"]), "homo") == "15.1 meV"
    model, meta = hub.load_pretrained("fam-u0")  # by name
    assert meta["targets"][0]["name"] == "U0"
    assert hub.expand_names("fam") == ["fam-homo", "fam-u0"] and hub.expand_names("fam-u0") == ["fam-u0"]


def test_save_refuses_unsafe_names_and_non_json_metadata(tmp_path):
    from equiformer.models import build_model

    model = build_model("equiformer", **TINY_CONFIG)
    base = {"model": {"name": "equiformer", "config": model.config}, "targets": [{"name": "homo", "unit": "eV"}],
            "normalization": {"mean": [0.0], "std": [1.0]}}
    with pytest.raises(hub.PretrainedError, match="invalid model name"):
        hub.save_pretrained(model, base, tmp_path, name="../escape")
    with pytest.raises(hub.PretrainedError, match="cannot be stored in JSON"):
        hub.save_pretrained(model, {**base, "extra": object()}, tmp_path, name="x")
    with pytest.raises(hub.PretrainedError, match="non-finite"):
        hub.save_pretrained(model, {**base, "normalization": {"mean": [float("nan")], "std": [1.0]}}, tmp_path, name="x")


def test_round_trip_check_uses_a_crystal_for_periodic_models(tmp_path):
    """Crystal models (ComFormer's lattice graph refuses molecules) are checked on rock salt; a
    changed weight after saving is caught."""
    from equiformer.models import build_model

    torch.manual_seed(0)
    model = build_model("icomformer", preset="tiny").eval()
    meta = {"model": {"name": "icomformer", "config": model.config}, "targets": [{"name": "e_form", "unit": "eV/atom"}],
            "normalization": {"mean": [0.0], "std": [1.0]}, "domain": {"periodic": True}}
    js = hub.save_pretrained(model, meta, tmp_path, name="crystal")
    hub._check_round_trip(model, js)  # a molecule would raise ValueError from the crystal graph
    with torch.no_grad():
        model.head[-1].bias.add_(1.0)
    with pytest.raises(hub.PretrainedError, match="does not reproduce"):
        hub._check_round_trip(model, js)


def test_export_refuses_a_checkpoint_with_pickled_objects(tmp_path):
    import argparse  # a Namespace in hyper_parameters (as some CLIs store) is not allowlisted by weights_only

    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": argparse.Namespace(name="equiformer")}}, path)
    with pytest.raises(hub.PretrainedError, match="cannot be loaded safely"):
        hub.export_from_lightning(path, "bad", tmp_path)
    with pytest.raises(FileNotFoundError):
        hub.export_from_lightning(tmp_path / "missing.ckpt", "bad", tmp_path)


# --------------------------------------------------------------------------- the models shipped in the package

SHIPPED = sorted(p.stem for p in hub.PACKAGE_DIR.glob("*.json"))


@pytest.mark.skipif(not SHIPPED, reason="no pretrained model shipped yet")
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_load_and_predict_finite_values(name):
    """Each shipped model predicts finite values for structures of its domain: crystals (Si, rock
    salt) for periodic models, molecules (water, methane) for molecular ones."""
    from equiformer.api import Predictor

    p = Predictor.from_pretrained(name, device="cpu")
    meta = p.models[0].meta
    if (meta.get("domain") or {}).get("periodic"):
        from ase.build import bulk

        inputs = [bulk("Si"), bulk("NaCl", "rocksalt", a=5.64)]
        formulas = ["Si2", "ClNa"]
    else:
        inputs, formulas = ["O", "C"], ["H2O", "CH4"]
    df = p.predict(inputs)
    values = df.drop(columns=["input", "formula"]).to_numpy(dtype=float)
    assert values.shape == (2, len(p.properties)) and np.isfinite(values).all()
    assert df["formula"].tolist() == formulas
    assert meta["dataset"] and meta["elements"] and meta["metrics"].get("test_mae")
