"""The distribution installs datasets/ and tasks/ as equiformer.datasets / equiformer.tasks.

They must never become top-level ``datasets`` / ``tasks`` modules: a top-level ``datasets``
would shadow Hugging Face's package in a user's environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json, equiformer, equiformer.datasets, equiformer.tasks
top = {name: (importlib.util.find_spec(name).origin if importlib.util.find_spec(name) else None)
       for name in ("datasets", "tasks")}
print(json.dumps({"equiformer": equiformer.__file__, "datasets": equiformer.datasets.__file__,
                  "tasks": equiformer.tasks.__file__, "top": top}))
"""


def _probe(env_extra: dict[str, str] | None, cwd: Path) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _not_ours(origin: str | None, root: Path) -> bool:
    return origin is None or not Path(origin).resolve().is_relative_to(root.resolve())


def test_package_list_is_complete():
    """Every folder with an __init__.py under equiformer/, datasets/, tasks/ is listed in pyproject."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = {"equiformer": "equiformer", "datasets": "equiformer.datasets", "tasks": "equiformer.tasks"}
    found = set()
    for folder, name in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found == listed, f"pyproject packages differ: missing {found - listed}, stale {listed - found}"


def test_editable_install_maps_namespace(tmp_path):
    info = _probe(None, tmp_path)  # cwd outside the repo: only the installation is seen
    if not Path(info["equiformer"]).resolve().is_relative_to(ROOT.resolve()):
        pytest.skip("equiformer is not installed in editable mode from this checkout")
    assert Path(info["datasets"]).resolve() == (ROOT / "datasets" / "__init__.py").resolve()
    assert Path(info["tasks"]).resolve() == (ROOT / "tasks" / "__init__.py").resolve()
    for name, origin in info["top"].items():
        assert _not_ours(origin, ROOT), f"a top-level '{name}' module comes from us: {origin}"


def test_wheel_installs_namespace_not_top_level(tmp_path):
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(ROOT)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheel_dir.glob("equiformer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_levels = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_levels == {"equiformer"}, f"wheel installs top-level packages {top_levels}"
    assert "equiformer/datasets/__init__.py" in names and "equiformer/tasks/__init__.py" in names

    target = tmp_path / "site"
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True,
    )
    assert inst.returncode == 0, inst.stderr[-2000:]
    info = _probe({"PYTHONPATH": str(target)}, tmp_path)
    for key in ("equiformer", "datasets", "tasks"):
        assert Path(info[key]).resolve().is_relative_to(target.resolve()), f"{key} imported from {info[key]}"
    for name, origin in info["top"].items():
        assert origin is None or not Path(origin).resolve().is_relative_to(target.resolve()), (
            f"the wheel provides a top-level '{name}' module: {origin}"
        )
