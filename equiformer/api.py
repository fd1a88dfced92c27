"""`Predictor`: properties of molecules from a shipped model, for chemists.

>>> from equiformer import Predictor
>>> p = Predictor.from_pretrained("qm9-equiformer")          # doctest: +SKIP
>>> p.predict(["CCO", "water.xyz", atoms, rdkit_mol])          # doctest: +SKIP
   input    formula  homo (eV)  lumo (eV)  ...

Inputs may be SMILES strings (3D geometry from RDKit ETKDG + MMFF), structure files (any format
:func:`equiformer.data.read` knows; a file with several structures gives several rows),
``ase.Atoms``, pymatgen ``Structure``/``Molecule``, RDKit ``Mol`` or PyG ``Data`` of the
data contract. Values come in each property's unit, named in the column (``"homo (eV)"``).

Crystals (CIF, POSCAR, extxyz with a lattice, pymatgen ``Structure``, periodic ``ase.Atoms``) go to
the Materials Project models :data:`DEFAULT_CRYSTAL_MODELS` (formation energy per atom in
eV/atom, PBE band gap in eV): ``Predictor.from_pretrained(DEFAULT_CRYSTAL_MODELS).predict("NaCl.cif")``.

The model's applicability domain is enforced: an element the model never saw in training
(e.g. Cl for QM9, which holds only H, C, N, O, F) or a periodic structure given to a molecular
model is refused (``on_unknown="raise"``, the default) or gives a warning and a NaN row
(``on_unknown="warn"``); molecules larger than any in training give an
:class:`ExtrapolationWarning`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: File suffixes treated as structure files when a string input has one (else it is SMILES).
FILE_SUFFIXES = (".xyz", ".extxyz", ".sdf", ".mol", ".mol2", ".pdb", ".cif", ".vasp", ".poscar", ".json", ".traj")
FILE_NAMES = ("POSCAR", "CONTCAR")

DEFAULT_MODEL = "qm9-equiformer"
#: Shipped crystal models used for periodic inputs when no model is named (``equiformer predict NaCl.cif``):
#: formation energy per atom (eV/atom) and PBE band gap (eV), trained on Materials Project structures.
DEFAULT_CRYSTAL_MODELS: tuple[str, ...] = ("mp-eform", "mp-gap")


class ExtrapolationWarning(UserWarning):
    """A structure lies outside the training data's size range; the prediction extrapolates."""


class OutOfDomainWarning(UserWarning):
    """A structure the model cannot handle (unknown element, periodic for a molecular model): NaN row."""


class OutOfDomainError(ValueError):
    """A structure the model cannot handle (unknown element, periodic structure for a molecular model)."""


@dataclass
class Structure:
    """One converted input: a display label and contract ``Data``."""

    label: str
    data: Any  # torch_geometric.data.Data
    notes: list[str] = field(default_factory=list)


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available (use --device cpu)")
    return dev


def _symbols(zs: Iterable[int]) -> str:
    from equiformer.data.contract import CHEMICAL_SYMBOLS

    return ", ".join(CHEMICAL_SYMBOLS[int(z)] for z in sorted(set(int(z) for z in zs)))


def _number(x: float) -> str:
    """4 significant digits, without an exponent below 1e7 (54243 rather than 5.424e+04)."""
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"


def is_periodic(data: Any) -> bool:
    """True when ``data`` (contract ``Data``) is periodic in all three directions with a non-degenerate cell."""
    pbc = getattr(data, "pbc", None)
    cell = getattr(data, "cell", None)
    if pbc is None or cell is None or not bool(torch.as_tensor(pbc).all()):
        return False
    return abs(float(torch.linalg.det(torch.as_tensor(cell, dtype=torch.float64).view(3, 3)))) > 1e-6


def column_name(target: Mapping[str, Any]) -> str:
    """DataFrame column of a target: ``"homo (eV)"``, or just the name when unitless."""
    unit = target.get("unit") or ""
    return f"{target['name']} ({unit})" if unit else str(target["name"])


# --------------------------------------------------------------------------- inputs -> Data


def _looks_like_file(s: str) -> bool:
    """True when a string names a structure file by its suffix or name (else it is read as SMILES)."""
    from equiformer.data.io import EXTENSIONS

    p = Path(s[:-3] if s.lower().endswith(".gz") else s)
    # Only known suffixes/names: SMILES may contain '/' (stereo bonds) and '.' (fragments).
    suffix = p.suffix.lower()
    return suffix in EXTENSIONS or suffix in FILE_SUFFIXES or p.name.upper().startswith(FILE_NAMES)


def to_structures(item: Any, index: int = 0, seed: int = 0) -> list[Structure]:
    """Convert one user input into one or more :class:`Structure` (a file may hold several).

    A string is a file when it names an existing file or ends in a structure-file suffix
    (``.xyz``, ``.sdf``, ``.cif``, ... or ``POSCAR*``/``CONTCAR*``); otherwise it is SMILES.

    Raises:
        ValueError: a bad SMILES or an unreadable structure (message names it).
        FileNotFoundError: a string that names a structure file which does not exist.
        TypeError: an object of an unsupported type.
    """
    from equiformer import data as eqdata

    if isinstance(item, Structure):  # already converted (e.g. by the CLI, to pick a model per input)
        return [item]
    if isinstance(item, (str, os.PathLike)):
        s = os.fspath(item)
        p = Path(s).expanduser()
        if isinstance(item, os.PathLike) or p.is_file() or _looks_like_file(s):
            if not p.exists():
                raise FileNotFoundError(f"{s}: no such file")
            if p.is_dir():
                raise ValueError(f"{s}: is a directory, not a structure file")
            datas = eqdata.read(p)
            if len(datas) == 0:
                raise ValueError(f"{s}: no structures in the file")
            if len(datas) == 1:
                return [Structure(s, datas[0])]
            return [Structure(f"{s}[{i}]", d) for i, d in enumerate(datas)]
        s = s.strip()
        if not s:
            raise ValueError("empty input (expected a SMILES string or a structure file)")
        return [Structure(s, eqdata.from_smiles(s, seed=seed))]
    mod = type(item).__module__
    if mod.startswith("torch_geometric"):
        if not hasattr(item, "z") or not hasattr(item, "pos"):
            raise ValueError(f"input {index}: a Data object needs 'z' and 'pos' fields (the data contract)")
        label = getattr(item, "source", None) or getattr(item, "name", None) or f"Data[{index}]"
        return [Structure(str(label), item)]
    if mod.startswith("ase") or _is_ase_atoms(item):  # pymatgen's MSONAtoms subclasses ase.Atoms
        return [Structure(f"Atoms[{index}]:{item.get_chemical_formula()}", eqdata.from_ase(item, properties=False))]
    if mod.startswith("pymatgen"):
        name = type(item).__name__
        return [Structure(f"{name}[{index}]:{item.composition.reduced_formula}", eqdata.from_pymatgen(item))]
    if mod.startswith("rdkit"):
        from rdkit import Chem

        try:
            label = Chem.MolToSmiles(Chem.RemoveHs(item))
        except Exception:  # noqa: BLE001  (label only)
            label = f"Mol[{index}]"
        if isinstance(item, Chem.Mol) and item.GetNumAtoms() and item.GetNumConformers() == 0:
            # a Mol from SMILES has no geometry: embed it as from_smiles does (ETKDG + MMFF)
            return [Structure(label, eqdata.from_smiles(Chem.MolToSmiles(item), seed=seed))]
        return [Structure(label, eqdata.from_rdkit(item))]
    raise TypeError(
        f"input {index}: cannot predict for a {type(item).__module__}.{type(item).__name__}; give a SMILES string, "
        "a file path, ase.Atoms, a pymatgen Structure/Molecule, an RDKit Mol or a torch_geometric Data"
    )


def _is_ase_atoms(item: Any) -> bool:
    """True for ``ase.Atoms`` and its subclasses (e.g. pymatgen's ``MSONAtoms``), without importing ase."""
    return any(c.__name__ == "Atoms" and c.__module__.startswith("ase.") for c in type(item).__mro__)


def _clean(data: Any, dtype: torch.dtype) -> Any:
    """A fresh Data with only the contract's geometry fields (so mixed inputs batch together)."""
    from torch_geometric.data import Data

    z = torch.as_tensor(data.z, dtype=torch.long).view(-1)
    pos = torch.as_tensor(data.pos).to(dtype).view(-1, 3)
    cell = getattr(data, "cell", None)
    cell = torch.zeros(1, 3, 3, dtype=dtype) if cell is None else torch.as_tensor(cell).to(dtype).view(1, 3, 3)
    pbc = getattr(data, "pbc", None)
    pbc = torch.zeros(1, 3, dtype=torch.bool) if pbc is None else torch.as_tensor(pbc, dtype=torch.bool).view(1, 3)
    return Data(z=z, pos=pos, cell=cell, pbc=pbc)


# --------------------------------------------------------------------------- one model


class LoadedModel:
    """A network with its metadata: applicability domain and de-normalisation."""

    def __init__(self, model: torch.nn.Module, meta: Mapping[str, Any]):
        self.model = model
        self.meta = dict(meta)
        self.name: str = self.meta["name"]
        self.targets: list[dict[str, Any]] = [dict(t) for t in self.meta["targets"]]
        self.elements: set[int] | None = set(int(e) for e in self.meta["elements"]) if self.meta.get("elements") else None
        self.domain: dict[str, Any] = dict(self.meta.get("domain") or {})

    @property
    def dtype(self) -> torch.dtype:
        p = next(iter(self.model.parameters()), None)
        return p.dtype if p is not None else torch.float32

    @property
    def device(self) -> torch.device:
        p = next(iter(self.model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    def refusal(self, data: Any) -> str | None:
        """Why this model cannot predict for ``data`` (unknown element, periodic), or None."""
        zs = set(torch.as_tensor(data.z).view(-1).tolist())
        ds = self.meta.get("dataset") or "its training set"
        if self.elements is not None and not zs <= self.elements:
            return (
                f"contains {_symbols(zs - self.elements)}, an element model {self.name!r} never saw in training "
                f"({ds} has only {_symbols(self.elements)})"
            )
        pbc = getattr(data, "pbc", None)
        if self.domain.get("periodic") is False and pbc is not None and bool(torch.as_tensor(pbc).any()):
            return f"is periodic, but model {self.name!r} was trained on isolated molecules ({ds})"
        if self.domain.get("periodic") is True and not is_periodic(data):
            flags = "none" if pbc is None else str([bool(v) for v in torch.as_tensor(pbc).view(-1).tolist()])
            return (f"is not periodic in all three directions (pbc {flags}), but model {self.name!r} was trained on "
                    f"bulk crystals ({ds}); give a structure with a unit cell (CIF, POSCAR, extxyz with Lattice)")
        return None

    def extrapolation(self, data: Any) -> str | None:
        """A note when ``data`` is larger than the training molecules, else None."""
        z = torch.as_tensor(data.z).view(-1)
        n, heavy = int(z.numel()), int((z > 1).sum())
        max_atoms, max_heavy = self.domain.get("max_atoms"), self.domain.get("max_heavy_atoms")
        ds = self.meta.get("dataset") or "the training set"
        if (max_atoms and n > max_atoms) or (max_heavy and heavy > max_heavy):
            return (
                f"{n} atoms ({heavy} heavy) is larger than any molecule in {ds} "
                f"(<= {max_atoms} atoms, <= {max_heavy} heavy atoms): model {self.name!r} extrapolates"
            )
        return None

    def size_error_note(self, data: Any, factor: float = 2.0) -> str | None:
        """A note when the model's measured test error for molecules of ``data``'s size (heavy atoms)
        is more than ``factor`` times its overall test error on some target, else None.

        Reads ``metrics.test_mae_by_heavy_atoms`` (written by ``leaderboards/qm9/error_by_size.py``).
        """
        bins = (self.meta.get("metrics") or {}).get("test_mae_by_heavy_atoms")
        overall = (self.meta.get("metrics") or {}).get("test_mae") or {}
        if not bins or not overall:
            return None
        heavy = int((torch.as_tensor(data.z).view(-1) > 1).sum())
        row = next((b for b in bins if int(b["min"]) <= heavy <= int(b["max"])), None)
        if row is None:
            return None
        scale = {"eV": 1.0, "meV": 1e-3, "eV/atom": 1.0, "meV/atom": 1e-3}
        worse = []
        for name, m in row["mae"].items():
            ref = overall.get(name) or {}
            value, unit, ref_value, ref_unit = m.get("value"), m.get("unit"), ref.get("value"), ref.get("unit")
            if value is None or not ref_value:
                continue
            if unit != ref_unit:
                if unit not in scale or ref_unit not in scale:
                    continue  # units we cannot compare: say nothing rather than something wrong
                ref_value = ref_value * scale[ref_unit] / scale[unit]
            if value > factor * ref_value:
                worse.append(f"{name} {_number(value)} {unit} (all test molecules: {_number(ref_value)} {unit})")
        if not worse:
            return None
        ds = self.meta.get("dataset") or "the training set"
        return (f"model {self.name!r} is much less accurate for molecules with {row['heavy_atoms']} heavy atoms: "
                f"test MAE on the {row['count']} such {ds} test molecule{'s' if int(row['count']) != 1 else ''}: " + ", ".join(worse))

    def forward_values(self, batch: Any) -> torch.Tensor:
        """[B, T] properties in the targets' units for a PyG Batch already on the model's device."""
        from equiformer.hub import denormalize

        out = self.model(batch)
        y = out["y"] if isinstance(out, Mapping) else out
        if y.dim() == 1:
            y = y.unsqueeze(-1)
        if y.shape != (batch.num_graphs, len(self.targets)):
            raise ValueError(
                f"model {self.name!r} returned y of shape {tuple(y.shape)}, expected "
                f"({batch.num_graphs}, {len(self.targets)}) for its targets {[t['name'] for t in self.targets]}"
            )
        # float64: atomref sums reach ~1e4 eV (QM9 U0) where float32 keeps only ~1e-3 eV.
        return denormalize(y.to(torch.float64), batch.z, batch.batch, self.meta)


# --------------------------------------------------------------------------- Predictor


class Predictor:
    """Predict properties with one or several shipped models (one column per property).

    Args:
        models: ``(network, metadata)`` pairs as returned by :func:`equiformer.hub.load_pretrained`.
        device: where to run; None picks CUDA when available.
    """

    def __init__(self, models: Sequence[tuple[torch.nn.Module, Mapping[str, Any]]], device: str | torch.device | None = None):
        if not models:
            raise ValueError("Predictor needs at least one model")
        self.device = _default_device(device)
        self.models = [LoadedModel(m.to(self.device).eval(), meta) for m, meta in models]
        seen: dict[str, str] = {}
        for lm in self.models:
            for t in lm.targets:
                if t["name"] in seen:
                    raise ValueError(f"property {t['name']!r} is predicted by both {seen[t['name']]!r} and {lm.name!r}; load one of them")
                seen[t["name"]] = lm.name

    @classmethod
    def from_pretrained(
        cls, names: str | os.PathLike | Sequence[str | os.PathLike] = DEFAULT_MODEL, device: str | torch.device | None = None
    ) -> Predictor:
        """Load shipped models by name (or path to their ``.json``/``.safetensors``).

        Several names merge into one table. A name that is not shipped but prefixes shipped
        models (``"qm9-equiformer"`` for ``"qm9-equiformer-homo"``, ...) loads that family.
        """
        from equiformer import hub

        if isinstance(names, (str, os.PathLike)):
            names = [names]
        expanded = [n for name in names for n in hub.expand_names(name)]
        dev = _default_device(device)
        return cls([hub.load_pretrained(n, device=dev) for n in expanded], device=dev)

    # ---- description

    @property
    def properties(self) -> list[dict[str, Any]]:
        """One dict per predicted property: name, unit, description, model, test_mae ({"value", "unit"} or None)."""
        from equiformer.hub import test_mae

        out = []
        for lm in self.models:
            mae = test_mae(lm.meta)
            for t in lm.targets:
                out.append({"name": t["name"], "unit": t.get("unit", ""), "description": t.get("description", ""),
                            "model": lm.name, "test_mae": mae.get(t["name"])})
        return out

    @property
    def columns(self) -> list[str]:
        """DataFrame columns of :meth:`predict`."""
        return ["input", "formula", *[column_name(t) for lm in self.models for t in lm.targets]]

    def __repr__(self) -> str:
        names = ", ".join(lm.name for lm in self.models)
        return f"Predictor(models=[{names}], properties={len(self.properties)}, device={self.device})"

    # ---- prediction

    def predict(
        self,
        inputs: Any,
        batch_size: int = 64,
        progress: bool = False,
        as_dict: bool = False,
        on_unknown: str = "raise",
        seed: int = 0,
    ):
        """Predict every property for every input.

        Args:
            inputs: one input or a list (SMILES, file paths, ase.Atoms, pymatgen, RDKit Mol, PyG Data).
            batch_size: structures per forward pass.
            progress: show a tqdm progress bar (conversion + prediction).
            as_dict: return JSON-ready dicts instead of a DataFrame: ``{"input", "formula",
                <property>: {"value": float | None, "unit": str}}`` (a list of them for a list input).
            on_unknown: ``"raise"`` (default) refuses structures outside the model's domain
                (unknown element, periodic for a molecular model) with :class:`OutOfDomainError`;
                ``"warn"`` gives an :class:`OutOfDomainWarning` and NaN values instead.
            seed: seed of the RDKit conformer embedding for SMILES.
        Returns:
            ``pandas.DataFrame`` with columns ``input``, ``formula`` and one ``"<name> (<unit>)"``
            per property (one row per structure), or dict(s) when ``as_dict``. Notes
            (extrapolation, refusals) are in ``df.attrs["notes"]`` ({row: [str]}).
        """
        if on_unknown not in ("raise", "warn"):
            raise ValueError(f"on_unknown must be 'raise' or 'warn', not {on_unknown!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        single = not isinstance(inputs, (list, tuple)) and not _is_iterable_collection(inputs)
        items = [inputs] if single else list(inputs)
        structures, values = self._run(items, batch_size, progress, on_unknown, seed)
        if as_dict:
            records = self.records(structures, values)
            return records[0] if single and len(records) == 1 else records
        return self.frame(structures, values)

    def _run(self, items: list[Any], batch_size: int, progress: bool, on_unknown: str, seed: int):
        from tqdm.auto import tqdm

        structures: list[Structure] = []
        chunks: list[np.ndarray] = []
        bar = tqdm(total=len(items), unit="input", desc="predict", disable=not progress)
        try:
            for start in range(0, len(items), batch_size):
                part: list[Structure] = []
                for k, item in enumerate(items[start:start + batch_size]):
                    part.extend(to_structures(item, index=start + k, seed=seed))
                chunks.append(self._predict_structures(part, batch_size, on_unknown))
                structures.extend(part)
                bar.update(min(batch_size, len(items) - start))
        finally:
            bar.close()
        n_props = sum(len(lm.targets) for lm in self.models)
        values = np.concatenate(chunks, axis=0) if chunks else np.zeros((0, n_props))
        self._warn_extrapolation(structures)
        return structures, values

    def _predict_structures(self, structures: list[Structure], batch_size: int, on_unknown: str) -> np.ndarray:
        """[S, P] values (NaN where refused) for converted structures; appends notes."""
        from torch_geometric.data import Batch

        cols = []
        for lm in self.models:
            vals = np.full((len(structures), len(lm.targets)), np.nan)
            ok: list[int] = []
            for i, s in enumerate(structures):
                why = lm.refusal(s.data)
                if why is not None:
                    msg = f"{s.label}: {why}"
                    if on_unknown == "raise":
                        raise OutOfDomainError(msg + " (on_unknown='warn' gives NaN instead)")
                    warnings.warn(msg + "; its values are NaN", OutOfDomainWarning, stacklevel=4)
                    s.notes.append(why)
                    continue
                for note in (lm.extrapolation(s.data), lm.size_error_note(s.data)):
                    if note is not None and note not in s.notes:
                        s.notes.append(note)
                ok.append(i)
            for start in range(0, len(ok), batch_size):
                idx = ok[start:start + batch_size]
                batch = Batch.from_data_list([_clean(structures[i].data, lm.dtype) for i in idx]).to(lm.device)
                with torch.no_grad():
                    v = lm.forward_values(batch)
                vals[idx] = v.detach().to("cpu", torch.float64).numpy()
            cols.append(vals)
        return np.concatenate(cols, axis=1)

    @staticmethod
    def _warn_extrapolation(structures: list[Structure]) -> None:
        notes = [f"{s.label}: {n}" for s in structures for n in s.notes if "extrapolates" in n]
        if notes:
            more = f" (+{len(notes) - 3} more)" if len(notes) > 3 else ""
            warnings.warn(f"{len(notes)} input(s) outside the training size range: " + "; ".join(notes[:3]) + more,
                          ExtrapolationWarning, stacklevel=4)

    # ---- output shapes

    def frame(self, structures: list[Structure], values: np.ndarray):
        """DataFrame of :meth:`predict` from converted structures and their [S, P] values."""
        import pandas as pd

        from equiformer.data.contract import formula

        rows = {"input": [s.label for s in structures], "formula": [formula(s.data.z) for s in structures]}
        for j, name in enumerate(self.columns[2:]):
            rows[name] = values[:, j] if len(structures) else np.zeros(0)
        df = pd.DataFrame(rows, columns=self.columns)
        df.attrs["notes"] = {i: list(s.notes) for i, s in enumerate(structures) if s.notes}
        df.attrs["units"] = {p["name"]: p["unit"] for p in self.properties}
        df.attrs["models"] = [lm.name for lm in self.models]
        return df

    def records(self, structures: list[Structure], values: np.ndarray) -> list[dict[str, Any]]:
        """JSON-ready dicts: ``{"input", "formula", <property>: {"value", "unit"}, ["notes"]}``."""
        from equiformer.data.contract import formula

        props = self.properties
        out = []
        for i, s in enumerate(structures):
            rec: dict[str, Any] = {"input": s.label, "formula": formula(s.data.z)}
            for j, p in enumerate(props):
                v = float(values[i, j])
                rec[p["name"]] = {"value": v if math.isfinite(v) else None, "unit": p["unit"]}
            if s.notes:
                rec["notes"] = list(s.notes)
            out.append(rec)
        return out


def _is_iterable_collection(x: Any) -> bool:
    """True for generators/arrays of inputs; False for a single input object (str, Path, Atoms, Data, Mol)."""
    if isinstance(x, (str, bytes, os.PathLike, Mapping)):
        return False
    mod = type(x).__module__
    if mod.startswith(("ase", "pymatgen", "rdkit", "torch_geometric")):
        return False
    return isinstance(x, Iterable)
