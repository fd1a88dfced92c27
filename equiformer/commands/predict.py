"""`equiformer predict`: properties of molecules or crystals from SMILES strings or structure files.

Without ``--model``, molecules go to the QM9 model and periodic structures (CIF, POSCAR, extxyz
with a lattice, pymatgen JSON) to the Materials Project models (formation energy per atom in
eV/atom, PBE band gap in eV).

Examples::

    equiformer predict "CCO"
    equiformer predict NaCl.cif POSCAR
    equiformer predict water.xyz many.sdf --format csv --output props.csv
    equiformer predict "c1ccccc1" --model qm9-equiformer --format json
    equiformer predict --list-models
"""

from __future__ import annotations

import argparse
import sys

HELP = "predict properties of molecules (SMILES, XYZ, SDF) or crystals (CIF, POSCAR) with a shipped model"
DEFAULT_MODEL = "qm9-equiformer"  # kept equal to equiformer.api.DEFAULT_MODEL (not imported: keep startup fast)
DEFAULT_CRYSTAL_MODELS = ("mp-eform", "mp-gap")  # = equiformer.api.DEFAULT_CRYSTAL_MODELS


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.epilog = (
        "Inputs are SMILES strings (3D geometry from RDKit ETKDG + MMFF) or files: xyz, extxyz, sdf/mol "
        "(every molecule), cif, POSCAR/CONTCAR, extxyz with a lattice, pymatgen JSON. Crystals get the formation "
        "energy per atom (eV/atom) and band gap (eV) of the Materials Project models. Values are in the unit each "
        "column names."
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="SMILES string or structure file")
    parser.add_argument(
        "--model", "-m", action="append", metavar="NAME",
        help=f"shipped model name or path to its .json (default: {DEFAULT_MODEL} for molecules, "
        f"{' + '.join(DEFAULT_CRYSTAL_MODELS)} for crystals); repeat to merge several",
    )
    parser.add_argument("--format", "-f", choices=("table", "json", "csv"), default="table", help="output format (default table)")
    parser.add_argument("--output", "-o", metavar="FILE", help="write the result to FILE instead of standard output")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="structures per forward pass (default 64)")
    parser.add_argument(
        "--on-unknown", choices=("raise", "warn"), default="raise",
        help="structures outside the model's domain (elements never seen in training): raise an error (default) or warn and give NaN",
    )
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    parser.add_argument("--list-models", action="store_true", help="list the shipped models and exit")


def run(args: argparse.Namespace) -> int:
    if args.list_models:
        _write(args.output, list_models_text())
        return 0
    if not args.inputs:
        raise ValueError("give at least one INPUT (a SMILES string or a structure file), or --list-models")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, not {args.batch_size}")

    import warnings

    from equiformer.api import Predictor

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.model:
            groups = [(args.model, list(args.inputs))]
        else:
            groups = default_model_groups(list(args.inputs))
        results = []
        for names, items in groups:
            predictor = Predictor.from_pretrained(names, device=args.device)
            results.append((predictor, *_predict(predictor, items, args)))
    for w in caught:
        if issubclass(w.category, UserWarning) and w.category.__module__.startswith("equiformer"):
            print(f"equiformer predict: warning: {w.message}", file=sys.stderr)

    if args.format == "json":
        import json

        records = [r for predictor, structures, values in results for r in predictor.records(structures, values)]
        text = json.dumps(records, indent=2) + "\n"
    elif args.format == "csv":
        import pandas as pd

        frames = [predictor.frame(structures, values) for predictor, structures, values in results]
        text = (frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)).to_csv(index=False)
    else:
        text = "\n".join(format_table(predictor, structures, values) for predictor, structures, values in results)
    _write(args.output, text)
    return 0


def _predict(predictor, items: list, args: argparse.Namespace):
    from equiformer.api import OutOfDomainError

    try:
        return predictor._run(items, args.batch_size, args.progress, args.on_unknown, seed=0)
    except OutOfDomainError as exc:
        raise ValueError(str(exc).replace("on_unknown='warn'", "--on-unknown warn")) from None


def default_model_groups(inputs: list) -> list[tuple[list[str], list]]:
    """Inputs split by the default model that fits them: molecules -> the QM9 model, periodic
    structures (CIF, POSCAR, extxyz with a lattice, ...) -> the Materials Project crystal models.

    Returns ``[(model names, converted structures), ...]`` in order of first appearance.
    """
    from equiformer.api import to_structures

    molecules, crystals, order = [], [], []
    for i, item in enumerate(inputs):
        for s in to_structures(item, index=i, seed=0):
            pbc = getattr(s.data, "pbc", None)
            periodic = pbc is not None and bool(pbc.any())
            (crystals if periodic else molecules).append(s)
            kind = "crystal" if periodic else "molecule"
            if kind not in order:
                order.append(kind)
    groups = {"molecule": ([DEFAULT_MODEL], molecules), "crystal": (list(DEFAULT_CRYSTAL_MODELS), crystals)}
    return [groups[k] for k in order]


def _write(path: str | None, text: str) -> None:
    if path:
        with open(path, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


def _fmt(v: float) -> str:
    if v != v:  # NaN
        return "n/a"
    if v == 0 or 1e-3 <= abs(v) < 1e7:
        return f"{v:.4f}"
    return f"{v:.4e}"


def _grid(rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def model_header(predictor) -> str:
    """Which models, their training set and test MAE per property."""
    lines = []
    for lm in predictor.models:
        meta = lm.meta
        ds = meta.get("dataset") or "unknown data"
        split = meta.get("split")
        split_txt = ""
        if isinstance(split, dict):
            sizes = [f"{k} {v}" for k, v in split.items() if isinstance(v, int) and not isinstance(v, bool)]
            split_txt = f" (split: {', '.join(sizes)})" if sizes else ""
        elif isinstance(split, str):
            split_txt = f" (split: {split})"
        lines.append(f"model: {lm.name}: {meta.get('description', '')}")
        lines.append(f"trained on: {ds}{split_txt}")
    from equiformer.hub import format_mae

    rows = [["property", "unit", "test MAE", "description"]]
    for lm in predictor.models:
        for t in lm.targets:
            rows.append([t["name"], t.get("unit", ""), format_mae(lm.meta, t["name"]), t.get("description", "")])
    return "\n".join(lines) + "\n\n" + _grid(rows, right={2}) + "\n"


def format_table(predictor, structures, values) -> str:
    """Model header, then the values: properties as rows for a few inputs, inputs as rows for many."""
    from equiformer.data.contract import formula

    props = predictor.properties
    out = [model_header(predictor)]
    if len(structures) <= 6:
        head = ["property", "unit"] + [s.label for s in structures]
        rows = [head, ["formula", ""] + [formula(s.data.z) for s in structures]]
        for j, p in enumerate(props):
            rows.append([p["name"], p["unit"]] + [_fmt(float(values[i, j])) for i in range(len(structures))])
        out.append(_grid(rows, right=set(range(2, len(head)))))
    else:
        from equiformer.api import column_name

        head = ["input", "formula"] + [column_name(p) for p in props]
        rows = [head] + [
            [s.label, formula(s.data.z)] + [_fmt(float(values[i, j])) for j in range(len(props))]
            for i, s in enumerate(structures)
        ]
        out.append(_grid(rows, right=set(range(2, len(head)))))
    notes = [f"  {s.label}: {n}" for s in structures for n in s.notes]
    if notes:
        out.append("\nnotes:\n" + "\n".join(notes))
    return "\n".join(out) + "\n"


def list_models_text() -> str:
    from equiformer.hub import available_models, format_mae, read_metadata, search_dirs

    models = available_models()
    if not models:
        dirs = ", ".join(str(d) for d in search_dirs())
        return f"no pretrained models installed (searched {dirs})\n"
    rows = [["name", "dataset", "properties (test MAE)", "description"]]
    for m in models:
        try:
            meta = read_metadata(m["path"])
            props = ", ".join(t if t not in m["test_mae"] else f"{t} ({format_mae(meta, t)})" for t in m["targets"])
        except (ValueError, OSError):
            props = ", ".join(m["targets"])
        rows.append([m["name"], str(m["dataset"] or ""), props, m["description"]])
    return _grid(rows, right=set()) + "\n"
