"""Pretrained models shipped with the package: file format, registry, loading and export.

A shipped model is two files side by side, and nothing in them is executable:

``<name>.safetensors``
    the model's ``state_dict`` (parameters + persistent buffers; EMA weights when training
    kept them), float32, in the `safetensors <https://huggingface.co/docs/safetensors>`_ format.
``<name>.json``
    everything needed to rebuild and use the model::

        {"format_version": 1, "name": "qm9-equiformer", "description": "...",
         "model": {"name": "equiformer", "config": {...constructor kwargs...}},
         "targets": [{"name": "homo", "unit": "eV", "description": "...",
                      "minimum": 0.0}, ...],                      # minimum optional: predictions clamped to it
         "normalization": {"mean": [...], "std": [...],           # one per target
                           "mean_per_atom": [...],                 # optional (0 if absent)
                           "mode": ["per_molecule" | "per_atom", ...]},  # optional, informative
         "atomref": {"U0": {"1": -13.6, "6": -1029.8, ...}},     # per-element offsets (eV)
         "elements": [1, 6, 7, 8, 9],                             # seen in training
         "domain": {"max_atoms": 29, "max_heavy_atoms": 9, "periodic": false},
         "dataset": "QM9", "split": {...},
         "metrics": {"test_mae": {"homo": {"value": 0.015, "unit": "eV"}, ...}},
         "training": {"epochs": ..., "wall_time_s": ..., "device": ..., "command": ...},
         "weights": {"file": "qm9-equiformer.safetensors", "sha256": "...", "ema": true},
         "equiformer_version": "0.1.0", "license": "MIT"}

A model's normalised output ``out`` [B, T] becomes a property in its unit as
``value = out * std + mean + N * mean_per_atom + sum_atoms atomref[target][z]`` for a graph
of ``N`` atoms (:func:`denormalize`). Targets normalised per atom (extensive ones such as
total or atomization energies) have ``mean = 0`` and ``mean_per_atom`` = the training mean
per atom; files without ``mean_per_atom`` (all written before it existed) are per molecule
and give exactly the values they always gave.

Models are looked up by name in ``equiformer/pretrained/`` and in the directories listed in
the environment variable ``EQUIFORMER_MODELS`` (``os.pathsep``-separated), or given as a path
to either file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

#: newest file format this module reads. 2 = ``normalization.mean_per_atom`` present: written
#: only for models that use it, so that an equiformer reading version 1 refuses such a file
#: (it would ignore the per-atom term and be wrong by ``N * mean_per_atom``) instead of
#: mispredicting; files of per-molecule models stay version 1.
FORMAT_VERSION = 2
PACKAGE_DIR = Path(__file__).resolve().parent / "pretrained"
ENV_DIRS = "EQUIFORMER_MODELS"

#: Applicability domain of the datasets we know: elements seen in training and size limits.
KNOWN_DOMAINS: dict[str, dict[str, Any]] = {
    "QM9": {"elements": [1, 6, 7, 8, 9], "max_atoms": 29, "max_heavy_atoms": 9, "periodic": False},
}

#: Prefixes under which a LightningModule may keep the network (EMA copies first).
_EMA_PREFIXES = ("ema_model.module.", "ema.module.", "model_ema.module.", "ema_model.", "ema.", "model_ema.")
_PLAIN_PREFIXES = ("model.", "net.", "network.", "")


class PretrainedError(ValueError):
    """A pretrained model that cannot be found, read or rebuilt (message names the file)."""


# --------------------------------------------------------------------------- registry


def search_dirs() -> list[Path]:
    """Directories searched for ``<name>.json``: ``$EQUIFORMER_MODELS`` entries, then the package's."""
    dirs = [Path(p).expanduser() for p in os.environ.get(ENV_DIRS, "").split(os.pathsep) if p.strip()]
    return [*dirs, PACKAGE_DIR]


def _registry() -> dict[str, Path]:
    """name -> json path; earlier search directories win."""
    found: dict[str, Path] = {}
    for d in search_dirs():
        if not d.is_dir():
            continue
        for js in sorted(d.glob("*.json")):
            if js.with_suffix(".safetensors").exists():
                found.setdefault(js.stem, js)
    return found


def available_models() -> list[dict[str, Any]]:
    """Shipped (and ``$EQUIFORMER_MODELS``) models: one dict per model.

    Keys: ``name``, ``description``, ``dataset``, ``targets`` (names), ``units`` (per target),
    ``test_mae`` ({target: value in the target's unit}), ``path``.
    """
    out = []
    for name, js in sorted(_registry().items()):
        try:
            meta = read_metadata(js)
        except PretrainedError as exc:
            out.append({"name": name, "description": f"unreadable: {exc}", "dataset": None, "targets": [],
                        "units": {}, "test_mae": {}, "path": str(js)})
            continue
        out.append({
            "name": name,
            "description": meta.get("description", ""),
            "dataset": meta.get("dataset"),
            "targets": [t["name"] for t in meta["targets"]],
            "units": {t["name"]: t.get("unit", "") for t in meta["targets"]},
            "test_mae": test_mae(meta),
            "path": str(js),
        })
    return out


def test_mae(meta: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{target: {"value": MAE, "unit": unit}} from a model's metadata (empty when not measured).

    A bare number in the file is read as a MAE in the target's own unit.
    """
    units = {t["name"]: t.get("unit", "") for t in meta.get("targets", [])}
    raw = (meta.get("metrics") or {}).get("test_mae") or {}
    out: dict[str, dict[str, Any]] = {}
    for k, v in raw.items():
        if isinstance(v, Mapping) and isinstance(v.get("value"), (int, float)):
            out[k] = {"value": float(v["value"]), "unit": str(v.get("unit", units.get(k, "")))}
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = {"value": float(v), "unit": units.get(k, "")}
    return out


test_mae.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def format_mae(meta: Mapping[str, Any], target: str) -> str:
    """A target's test MAE for display, in its report unit when it has one (``"15.1 meV"``), or ``"n/a"``."""
    mae = test_mae(meta).get(target)
    if mae is None:
        return "n/a"
    value, unit = mae["value"], mae["unit"]
    t = next((t for t in meta["targets"] if t["name"] == target), {})
    if t.get("report_unit") and unit == t.get("unit") and t.get("report_scale"):
        value, unit = value * float(t["report_scale"]), t["report_unit"]
    return f"{value:.4g} {unit}".strip()


def resolve(name_or_path: str | os.PathLike) -> tuple[Path, Path]:
    """(json path, safetensors path) of a model given by registry name or by either file's path."""
    s = str(name_or_path)
    p = Path(s).expanduser()
    if p.suffix in (".json", ".safetensors") or p.exists() or os.sep in s:
        if p.is_dir():
            raise PretrainedError(f"{p}: is a directory; give a model name or its .json/.safetensors file")
        js, st = p.with_suffix(".json"), p.with_suffix(".safetensors")
        for f in (js, st):
            if not f.exists():
                raise FileNotFoundError(f"pretrained model {s!r}: {f} does not exist (need both {js.name} and {st.name})")
        return js, st
    reg = _registry()
    if s not in reg:
        names = ", ".join(sorted(reg)) or "none"
        raise PretrainedError(
            f"no pretrained model named {s!r}; available: {names} "
            f"(searched {', '.join(str(d) for d in search_dirs())})"
        )
    js = reg[s]
    return js, js.with_suffix(".safetensors")


def expand_names(name: str | os.PathLike) -> list[str | os.PathLike]:
    """A registry name, or the family of models ``name-*`` when ``name`` itself is not shipped."""
    s = str(name)
    reg = _registry()
    if s in reg or Path(s).suffix in (".json", ".safetensors") or os.sep in s or Path(s).exists():
        return [name]
    family = sorted(n for n in reg if n.startswith(s + "-"))
    return family or [name]  # resolve() gives the clear error


# --------------------------------------------------------------------------- metadata


def read_metadata(json_path: str | os.PathLike) -> dict[str, Any]:
    """Parse and check a model's ``.json`` (required keys, one mean/std per target)."""
    p = Path(json_path)
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError) as exc:
        raise PretrainedError(f"{p}: not a readable model description ({exc})") from None
    check_metadata(meta, where=str(p))
    return meta


def check_metadata(meta: Mapping[str, Any], where: str = "metadata") -> None:
    """Raise :class:`PretrainedError` naming ``where`` when required fields are missing or inconsistent."""
    if not isinstance(meta, Mapping):
        raise PretrainedError(f"{where}: expected a JSON object")
    for key in ("name", "model", "targets", "normalization"):
        if key not in meta:
            raise PretrainedError(f"{where}: missing field {key!r}")
    model = meta["model"]
    if not isinstance(model, Mapping) or "name" not in model or not isinstance(model.get("config", {}), Mapping):
        raise PretrainedError(f"{where}: field 'model' must be {{'name': str, 'config': {{...}}}}")
    targets = meta["targets"]
    if not targets or not all(isinstance(t, Mapping) and "name" in t for t in targets):
        raise PretrainedError(f"{where}: field 'targets' must be a non-empty list of {{'name', 'unit', ...}}")
    names = [t["name"] for t in targets]
    if len(set(names)) != len(names):
        raise PretrainedError(f"{where}: duplicate target names {names}")
    norm = meta["normalization"]
    for key in ("mean", "std"):
        vals = norm.get(key) if isinstance(norm, Mapping) else None
        if not isinstance(vals, list) or len(vals) != len(targets):
            raise PretrainedError(f"{where}: normalization.{key} must list one number per target ({len(targets)})")
    mpa = norm.get("mean_per_atom")
    if mpa is not None and (not isinstance(mpa, list) or len(mpa) != len(targets)
                            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in mpa)):
        raise PretrainedError(f"{where}: normalization.mean_per_atom must list one number per target ({len(targets)})")
    if mpa is not None and any(float(v) != 0.0 for v in mpa) and meta.get("format_version", 1) < 2:
        raise PretrainedError(f"{where}: normalization.mean_per_atom needs format_version 2 (readers of version 1 ignore it)")
    mode = norm.get("mode")
    if mode is not None and (not isinstance(mode, list) or len(mode) != len(targets)
                             or any(m not in ("per_molecule", "per_atom") for m in mode)):
        raise PretrainedError(f"{where}: normalization.mode must list 'per_molecule' or 'per_atom' per target ({len(targets)})")
    version = meta.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise PretrainedError(f"{where}: format_version {version} is newer than this equiformer reads ({FORMAT_VERSION}); upgrade equiformer")
    for t, table in (meta.get("atomref") or {}).items():
        if t not in names:
            raise PretrainedError(f"{where}: atomref given for {t!r}, which is not a target ({names})")
        if not all(str(k).isdigit() for k in table):
            raise PretrainedError(f"{where}: atomref[{t!r}] keys must be atomic numbers")


def minimum_row(minima: Sequence[float | None], like: torch.Tensor) -> torch.Tensor | None:
    """``[1, T]`` of the targets' physical minima (``-inf`` where a target has none), in ``like``'s
    dtype and device, or ``None`` when no target declares one."""
    if all(m is None for m in minima):
        return None
    return torch.tensor([[-math.inf if m is None else float(m) for m in minima]], dtype=like.dtype, device=like.device)


def clamp_to_minimum(value: torch.Tensor, minima: Sequence[float | None]) -> torch.Tensor:
    """Properties ``value [B, T]`` clamped from below at each target's ``minimum`` (band gaps: 0)."""
    lo = minimum_row(minima, value)
    return value if lo is None else torch.maximum(value, lo)


def denormalize(out: torch.Tensor, z: torch.Tensor, batch: torch.Tensor, meta: Mapping[str, Any]) -> torch.Tensor:
    """Model output [B, T] (normalised) -> properties [B, T] in the targets' units.

    ``value = out * std + mean + N * mean_per_atom + sum over the graph's atoms of atomref[target][z]``
    (``N`` = the graph's atoms; the per-atom term only when the metadata has ``mean_per_atom``),
    clamped from below where a target declares a ``minimum`` (band gaps: 0).

    Args:
        out: [B, T] normalised predictions.
        z: [N] atomic numbers; batch: [N] graph index of each atom.
        meta: the model's metadata (``targets``, ``normalization``, optional ``atomref``).
    """
    names = [t["name"] for t in meta["targets"]]
    norm = meta["normalization"]
    mean = torch.as_tensor(norm["mean"], dtype=out.dtype, device=out.device)
    std = torch.as_tensor(norm["std"], dtype=out.dtype, device=out.device)
    value = out * std + mean
    if norm.get("mean_per_atom") is not None:
        mpa = torch.as_tensor(norm["mean_per_atom"], dtype=out.dtype, device=out.device)
        n = torch.bincount(batch, minlength=out.shape[0]).to(out.dtype)  # [B] atoms per graph
        value = value + n[:, None] * mpa
    table = atomref_table(meta, dtype=out.dtype, device=out.device)
    if table is not None:
        per_atom = table[z]  # [N, T]
        value = value.index_add(0, batch, per_atom) if value.shape[0] else value
    # physical bounds a target declares (band gaps are >= 0: a metal's small negative output is 0)
    value = clamp_to_minimum(value, [t.get("minimum") for t in meta["targets"]])
    assert value.shape[-1] == len(names)
    return value


def atomref_table(meta: Mapping[str, Any], dtype=torch.float64, device=None) -> torch.Tensor | None:
    """[119, T] per-element offsets (zeros where not given), or None when the model has none."""
    refs = meta.get("atomref") or {}
    if not refs:
        return None
    names = [t["name"] for t in meta["targets"]]
    table = torch.zeros(119, len(names), dtype=dtype, device=device)
    for j, name in enumerate(names):
        for zk, v in (refs.get(name) or {}).items():
            table[int(zk), j] = float(v)
    return table


# --------------------------------------------------------------------------- save / load


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(x: Any, where: str) -> Any:
    """Plain JSON types from tensors/numpy/tuples; raise on anything else (no pickles in metadata)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, where) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist(), where)
    if hasattr(x, "tolist") and type(x).__module__.startswith("numpy"):
        return _jsonable(x.tolist(), where)
    if isinstance(x, float):
        if not math.isfinite(x):
            raise PretrainedError(f"{where}: non-finite number {x}")
        return x
    if x is None or isinstance(x, (bool, int, str)):
        return x
    raise PretrainedError(f"{where}: value of type {type(x).__name__} cannot be stored in JSON")


def save_pretrained(
    model: torch.nn.Module,
    metadata: Mapping[str, Any],
    out_dir: str | os.PathLike,
    name: str | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    ema: bool = False,
) -> Path:
    """Write ``<name>.safetensors`` + ``<name>.json`` into ``out_dir``; returns the json path.

    Args:
        model: the network (its ``config`` is stored unless ``metadata['model']`` gives one).
        metadata: fields of the json (see module docstring); ``name`` overrides ``metadata['name']``.
        state_dict: weights to store instead of ``model.state_dict()`` (e.g. EMA weights).
        ema: record that the stored weights are an exponential moving average.
    """
    from safetensors.torch import save_file

    from equiformer import __version__

    meta = dict(metadata)
    name = name or meta.get("name")
    if not name or any(c in name for c in "/\\ ") or name.startswith("."):
        raise PretrainedError(f"invalid model name {name!r} (use letters, digits, '-', '_', '.')")
    meta["name"] = name
    if "model" not in meta:
        config = getattr(model, "config", None)
        model_name = getattr(model, "model_name", None) or meta.get("model_name")
        if config is None or model_name is None:
            raise PretrainedError("metadata needs 'model': {'name', 'config'} (the model has no .config/.model_name)")
        meta["model"] = {"name": model_name, "config": dict(config)}
    uses_per_atom = any(float(v) != 0.0 for v in (meta.get("normalization") or {}).get("mean_per_atom") or [])
    meta.setdefault("format_version", 2 if uses_per_atom else 1)
    meta.setdefault("equiformer_version", __version__)
    meta.setdefault("license", "MIT")
    meta.setdefault("atomref", {})
    order = ("format_version", "name", "description", "dataset", "model", "targets", "normalization", "atomref",
             "elements", "domain", "split", "metrics", "training", "equiformer_version", "license")
    meta = {**{k: meta[k] for k in order if k in meta}, **{k: v for k, v in meta.items() if k not in order}}
    meta = _jsonable(meta, "metadata")
    check_metadata(meta, where=f"model {name!r}")

    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise PretrainedError(f"state_dict entry {k!r} is a {type(v).__name__}, not a tensor")
        v = v.detach().to("cpu")
        if v.is_floating_point():
            v = v.to(torch.float32)
        tensors[k] = v.contiguous().clone()  # clone: safetensors refuses shared storage

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    st_path, js_path = out / f"{name}.safetensors", out / f"{name}.json"
    save_file(tensors, str(st_path), metadata={"format": "pt", "equiformer_model": name})
    meta["weights"] = {"file": st_path.name, "sha256": _sha256(st_path), "dtype": "float32", "ema": bool(ema),
                       "num_parameters": int(sum(p.numel() for p in model.parameters()))}
    js_path.write_text(json.dumps(meta, indent=2) + "\n")
    return js_path


def build_from_metadata(meta: Mapping[str, Any]) -> torch.nn.Module:
    """Instantiate the (untrained) network a model's metadata describes."""
    from equiformer.models import build_model

    spec = meta["model"]
    try:
        return build_model(spec["name"], **dict(spec.get("config") or {}))
    except (TypeError, KeyError, ValueError) as exc:
        raise PretrainedError(
            f"model {meta.get('name')!r}: cannot build {spec['name']!r} from its config ({exc}); "
            "the file may come from another equiformer version"
        ) from None


def check_state_dict(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise :class:`PretrainedError` unless ``tensors`` has exactly the model's keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    mismatched = [
        f"{k}: file {tuple(tensors[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{label} {len(items)}: {', '.join(items[:3])}{more}")
        raise PretrainedError(f"{where}: weights do not match the model config: " + "; ".join(parts))


def load_pretrained(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype = torch.float32,
    verify_hash: bool = True,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a shipped or exported model: ``(model in eval mode, metadata dict)``.

    Reads only JSON and safetensors (no pickled code runs). Raises :class:`PretrainedError`
    when the weights' names or shapes do not match the model the config builds, when the
    weights file's checksum differs from the one recorded at export, and
    ``FileNotFoundError`` when a file is missing.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    js, st = resolve(name_or_path)
    meta = read_metadata(js)
    expected_hash = (meta.get("weights") or {}).get("sha256")
    if verify_hash and expected_hash and _sha256(st) != expected_hash:
        raise PretrainedError(f"{st}: checksum differs from the one in {js.name}; the weights file was changed or is corrupt")
    try:
        tensors = load_file(str(st), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise PretrainedError(f"{st}: not a readable safetensors file ({exc})") from None
    model = build_from_metadata(meta)
    check_state_dict(model, tensors, where=str(st))
    model.load_state_dict(tensors, strict=True)
    model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    meta["_path"] = str(js)
    return model, meta


# --------------------------------------------------------------------------- export from Lightning


def _task_fields(hp: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Model spec, targets, normalisation and atomrefs from a PropertyTask's hyper_parameters."""
    from equiformer.tasks.property import PropertyTask  # noqa: F401  (fails clearly if tasks are missing)

    if hasattr(PropertyTask, "export_metadata"):
        return dict(PropertyTask.export_metadata(hp))
    return _generic_task_fields(hp, where)


def _generic_task_fields(hp: Mapping[str, Any], where: str) -> dict[str, Any]:
    def first(*keys: str, default: Any = None) -> Any:
        for k in keys:
            if k in hp and hp[k] is not None:
                return hp[k]
        return default

    model_name = first("model_name", "model")
    config = first("model_config", "model_kwargs", default={})
    if isinstance(model_name, Mapping):  # {"name": ..., "config": ...}
        config = model_name.get("config", config)
        model_name = model_name.get("name")
    if not isinstance(model_name, str):
        raise PretrainedError(f"{where}: hyper_parameters name no model (keys: {sorted(hp)})")
    targets = first("targets", "target_names")
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise PretrainedError(f"{where}: hyper_parameters name no targets (keys: {sorted(hp)})")
    units = first("units", "target_units", default={})
    descriptions = first("descriptions", "target_descriptions", default={})
    tlist = []
    for i, t in enumerate(targets):
        if isinstance(t, Mapping):
            tlist.append(dict(t))
            continue
        unit = units.get(t, "") if isinstance(units, Mapping) else (units[i] if units else "")
        desc = descriptions.get(t, "") if isinstance(descriptions, Mapping) else (descriptions[i] if descriptions else "")
        tlist.append({"name": t, "unit": unit, "description": desc})
    norm = first("normalization", default=None)
    if norm is None:
        mean = first("mean", "target_mean", default=[0.0] * len(tlist))
        std = first("std", "target_std", default=[1.0] * len(tlist))
        norm = {"mean": mean, "std": std}
    atomref = first("atomref", "atomrefs", default={}) or {}
    names = [t["name"] for t in tlist]
    if not isinstance(atomref, Mapping):  # list per target or [119, T] table
        raise PretrainedError(f"{where}: atomref must be a mapping target -> {{Z: value}}")
    atomref = {t: {str(int(z)): float(v) for z, v in (tab.items() if isinstance(tab, Mapping) else enumerate(tab)) if float(v) != 0.0}
               for t, tab in atomref.items() if t in names}
    out = {"model": {"name": model_name, "config": dict(config)}, "targets": tlist, "normalization": norm, "atomref": atomref}
    for key in ("dataset", "split", "elements"):
        if hp.get(key) is not None:
            out[key] = hp[key]
    return out


def load_lightning_checkpoint(ckpt_path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a Lightning checkpoint, with a clear error when it holds code."""
    import pickle

    p = Path(ckpt_path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        import re

        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"(Unsupported[^\n.]*)", text)
        first_line = f"it contains {found.group(1)}" if found else (text.strip().splitlines() or [repr(exc)])[0]
        raise PretrainedError(
            f"{p}: holds objects that are not plain tensors/containers, so it cannot be loaded safely "
            f"(weights_only=True): {first_line}. Store plain types (str, int, float, list, dict) in the task's hyper_parameters."
        ) from None


def select_model_state(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], prefer_ema: bool = True, where: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], bool, str]:
    """The network's weights inside a LightningModule's state_dict: ``(weights, is_ema, prefix)``.

    Tries EMA prefixes first (``ema_model.module.``, ``ema.module.``, ...) when ``prefer_ema``,
    then ``model.`` and no prefix; the first prefix whose keys are exactly the model's wins.
    """
    expected = set(model.state_dict())
    candidates = [(p, True) for p in _EMA_PREFIXES] if prefer_ema else []
    candidates += [(p, False) for p in _PLAIN_PREFIXES]
    for prefix, is_ema in candidates:
        sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if set(sub) == expected:
            return sub, is_ema, prefix
    # Nothing matched exactly: report against the most plausible prefix.
    sub = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")} or dict(state_dict)
    check_state_dict(model, sub, where=where)
    raise PretrainedError(f"{where}: could not locate the model weights in the state_dict")  # pragma: no cover


def export_from_lightning(
    ckpt_path: str | os.PathLike,
    name: str,
    out_dir: str | os.PathLike | None = None,
    *,
    metrics: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    description: str | None = None,
    dataset: str | None = None,
    split: Any = None,
    elements: Iterable[int] | None = None,
    domain: Mapping[str, Any] | None = None,
    license: str = "MIT",
    prefer_ema: bool = True,
) -> Path:
    """Convert a Lightning checkpoint of a :class:`~equiformer.tasks.property.PropertyTask` into a shipped model.

    The checkpoint is read with ``torch.load(weights_only=True)``; weights come from the EMA copy
    when the checkpoint holds one (Lightning's ``EMAWeightAveraging`` already stores the averaged
    weights as ``state_dict``). The exported model is loaded back and checked to reproduce the
    task's network outputs exactly on a test molecule.

    Args:
        ckpt_path: the ``.ckpt`` file.
        name: model name (file stem), e.g. ``"qm9-equiformer"``.
        out_dir: where to write; default the package's ``equiformer/pretrained``.
        metrics: e.g. ``{"test_mae": {"homo": 0.0151}}`` (values in the target's unit) or
            ``{"test_mae": {"homo": {"value": 0.0151, "unit": "eV"}}}``.
        training: e.g. ``{"epochs": 300, "wall_time_s": 5400, "device": "H100", "command": "..."}``.
        dataset, split, elements, domain: override what the checkpoint says (QM9 defaults are known).
    Returns:
        Path of the written ``<name>.json``.
    """
    where = str(ckpt_path)
    ckpt = load_lightning_checkpoint(ckpt_path)
    hp = ckpt.get("hyper_parameters")
    if not isinstance(hp, Mapping):
        raise PretrainedError(f"{where}: no hyper_parameters (was the task created with save_hyperparameters()?)")
    fields = _task_fields(hp, where)
    meta: dict[str, Any] = {"name": name, **fields}
    model = build_from_metadata(meta)
    weights, is_ema, _ = select_model_state(model, ckpt["state_dict"], prefer_ema=prefer_ema, where=where)
    if "current_model_state" in ckpt and "averaging_state" in ckpt:
        is_ema = True  # Lightning's WeightAveraging put the averaged weights into state_dict
    model.load_state_dict(weights, strict=True)

    dm_hp = ckpt.get("datamodule_hyper_parameters") or {}
    ds = dataset or meta.get("dataset") or hp.get("dataset") or _guess_dataset(meta, dm_hp)
    if isinstance(ds, str) and ds.lower() == "qm9":
        ds = "QM9"
    meta["dataset"] = ds
    if split is None and dm_hp:
        split = _split_from_datamodule(ds, dm_hp)
    if dm_hp.get("subtract_atomref"):
        for t in meta["targets"]:
            if t["name"] in ("U0", "U", "H", "G"):
                t["description"] = (t.get("description", "") + " (atomization energy: free-atom references subtracted)").strip()
    known = dict(KNOWN_DOMAINS.get(ds or "", {}))
    if elements is not None:
        known["elements"] = [int(e) for e in elements]
    elif meta.get("elements") is not None:
        known["elements"] = [int(e) for e in meta["elements"]]
    meta["elements"] = sorted(known.pop("elements", [])) or None
    meta["domain"] = {**known, **(domain or {})}
    if split is not None:
        meta["split"] = split
    meta["description"] = description or _default_description(meta)
    meta["metrics"] = _normalise_metrics(metrics or {}, meta["targets"])
    meta["training"] = dict(training or {})
    meta["training"].setdefault("epochs", ckpt.get("epoch"))
    meta["training"].setdefault("global_step", ckpt.get("global_step"))
    meta["training"].setdefault("lightning_version", ckpt.get("pytorch-lightning_version"))
    commit = _git_commit()
    if commit:
        meta["training"].setdefault("exported_at_commit", commit)
    meta["license"] = license
    if meta["elements"] is None:
        meta.pop("elements")
    out = Path(out_dir) if out_dir is not None else PACKAGE_DIR
    js = save_pretrained(model, meta, out, name=name, ema=is_ema)
    _check_round_trip(model, js)
    return js


def _git_commit() -> str | None:
    """The equiformer source's git commit (with '+dirty' when changed), when it is a checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "equiformer"],
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _guess_dataset(meta: Mapping[str, Any], dm_hp: Mapping[str, Any]) -> str | None:
    """"QM9" when every target is a QM9 target and the datamodule looks like QM9DataModule."""
    try:
        from equiformer.datasets.qm9 import QM9_TARGET_NAMES
    except ImportError:  # pragma: no cover
        return None
    names = [t["name"] for t in meta["targets"]]
    if dm_hp and "split_seed" in dm_hp and all(n in QM9_TARGET_NAMES for n in names):
        return "QM9"
    return None


def _split_from_datamodule(ds: str | None, dm_hp: Mapping[str, Any]) -> dict[str, Any]:
    """{"train": n, "val": n, "test": n, "seed": s, ["subset": n]} from the datamodule's hyper-parameters."""
    out: dict[str, Any] = {}
    if ds == "QM9":
        try:
            from equiformer.tasks.datamodule import QM9DataModule

            keys = ("targets", "split_seed", "train_size", "val_size", "subset")
            dm = QM9DataModule(**{k: dm_hp[k] for k in keys if k in dm_hp})
            out.update({k: int(v) for k, v in dm.split_sizes().items()})
        except Exception:  # noqa: BLE001  (split sizes are informative only)
            pass
    for key in ("split_seed", "subset", "subtract_atomref"):
        if dm_hp.get(key) is not None:
            out["seed" if key == "split_seed" else key] = dm_hp[key]
    if "train" not in out:
        for key in ("train_size", "val_size"):
            if key in dm_hp:
                out[key.removesuffix("_size")] = dm_hp[key]
    return out


def _default_description(meta: Mapping[str, Any]) -> str:
    targets = ", ".join(t["name"] for t in meta["targets"])
    ds = meta.get("dataset") or "its training set"
    return f"{meta['model']['name']} trained on {ds}: {targets}"


def _normalise_metrics(metrics: Mapping[str, Any], targets: list[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"test_mae": {target: {"value", "unit"}}, ...}`` from what the caller gives.

    Accepted: ``{"test_mae": {target: number (target unit) or {"value", "unit"}}}`` and the dict
    Lightning's ``trainer.test()`` returns for a PropertyTask (``{"test/homo_mae_meV": 15.1, ...}``).
    """
    units = {t["name"]: t.get("unit", "") for t in targets}
    out: dict[str, Any] = {}
    mae: dict[str, Any] = dict(metrics.get("test_mae") or {})
    logged = {k: v for k, v in metrics.items() if isinstance(k, str) and k.startswith("test/")}
    if logged:
        try:
            from equiformer.tasks.metrics import mae_key
        except ImportError:  # pragma: no cover
            mae_key = None
        for t in targets:
            unit = t.get("report_unit") or t.get("unit", "")
            key = f"test/{mae_key(t['name'], unit)}" if mae_key else f"test/{t['name']}_mae_{unit}"
            if key in logged and t["name"] not in mae:
                mae[t["name"]] = {"value": float(logged[key]), "unit": unit}
    out.update({k: v for k, v in metrics.items() if k != "test_mae" and k not in logged})
    if mae:
        out["test_mae"] = {}
        for k, v in mae.items():
            if k not in units:
                raise PretrainedError(f"metrics.test_mae names {k!r}, which is not a target ({list(units)})")
            out["test_mae"][k] = dict(v) if isinstance(v, Mapping) else {"value": float(v), "unit": units[k]}
    return out


def _round_trip_structure(periodic: bool):
    """A small contract ``Data`` in float32: rock-salt NaCl (8-atom cubic cell, a = 5.64 Å) for
    periodic models (crystal graphs refuse molecules), methane otherwise."""
    from equiformer.data.contract import make_data

    if periodic:
        a = 5.64
        h = a / 2
        pos = [[0, 0, 0], [0, h, h], [h, 0, h], [h, h, 0], [h, h, h], [h, 0, 0], [0, h, 0], [0, 0, h]]
        return make_data([11] * 4 + [17] * 4, pos, cell=[[a, 0, 0], [0, a, 0], [0, 0, a]], pbc=[True] * 3,
                         dtype=torch.float32, source="round-trip check (rock salt)")
    pos = [[0.0, 0.0, 0.0], [0.629, 0.629, 0.629], [-0.629, -0.629, 0.629], [-0.629, 0.629, -0.629], [0.629, -0.629, -0.629]]
    return make_data([6, 1, 1, 1, 1], pos, dtype=torch.float32, source="round-trip check (methane)")


def _check_round_trip(model: torch.nn.Module, js: Path) -> None:
    """The exported files rebuild a network with identical outputs (float32; rock salt for models
    whose ``domain`` is periodic, methane otherwise)."""
    from torch_geometric.data import Batch

    loaded, meta = load_pretrained(js, device="cpu")
    periodic = bool((meta.get("domain") or {}).get("periodic"))
    batch = Batch.from_data_list([_round_trip_structure(periodic)])
    model = model.to("cpu", torch.float32).eval()
    with torch.no_grad():
        a, b = model(batch)["y"], loaded(batch)["y"]
    if not torch.equal(a, b):
        raise PretrainedError(f"{js}: exported model does not reproduce the checkpoint's outputs ({a.tolist()} vs {b.tolist()})")


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """``python -m equiformer.hub export CKPT --name NAME [--out DIR] [--metrics FILE.json] [...]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m equiformer.hub", description="Export and list pretrained models.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="Lightning checkpoint of a PropertyTask -> <name>.safetensors + <name>.json")
    ex.add_argument("checkpoint")
    ex.add_argument("--name", required=True, help="model name, e.g. qm9-equiformer-homo")
    ex.add_argument("--out", default=None, help=f"output folder (default {PACKAGE_DIR})")
    ex.add_argument("--metrics", default=None, help="JSON file: {'test_mae': {...}} or the dict trainer.test() returned")
    ex.add_argument("--training", default=None, help="JSON file: {'epochs', 'wall_time_s', 'device', 'command'}")
    ex.add_argument("--description", default=None)
    ex.add_argument("--no-ema", action="store_true", help="export the raw weights even when an EMA copy exists")
    sub.add_parser("list", help="list the available models")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "list":
            for m in available_models():
                print(f"{m['name']}\t{m['dataset']}\t{', '.join(m['targets'])}\t{m['path']}")
            return 0

        def read_json(path: str | None) -> Any:
            return json.loads(Path(path).read_text()) if path else None

        metrics = read_json(args.metrics)
        if isinstance(metrics, list):  # trainer.test() returns one dict per dataloader
            metrics = metrics[0]
        js = export_from_lightning(args.checkpoint, args.name, args.out, metrics=metrics, training=read_json(args.training),
                                   description=args.description, prefer_ema=not args.no_ema)
    except (ValueError, FileNotFoundError) as exc:
        print(f"equiformer.hub: error: {exc}")
        return 2
    print(js)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
