"""Conversions between ASE / pymatgen / RDKit objects and the data contract.

Every ``from_*`` function validates through :func:`equiformer.data.contract.make_data`
(unknown elements, non-finite coordinates, overlapping atoms, empty structures raise a
:class:`StructureError` that names the source) and sets ``data.source`` (a string naming
where the structure came from) and ``data.name`` (a title, "" when there is none).
Positions and cells are in Å, energies in eV, forces in eV/Å. Pass ``dtype=torch.float64``
for exact round trips (the default is torch's default dtype).

ASE, pymatgen and RDKit are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Batch, Data

from equiformer.data.contract import CHEMICAL_SYMBOLS, StructureError, formula
from equiformer.data.records import Record, to_data

__all__ = [
    "from_ase",
    "from_pymatgen",
    "from_rdkit",
    "from_smiles",
    "to_ase",
    "to_pymatgen",
    "to_rdkit",
]


def _single(data: Data, fn: str) -> None:
    if isinstance(data, Batch) and data.num_graphs != 1:
        raise ValueError(f"{fn} converts one structure; got a batch of {data.num_graphs} (use batch.to_data_list())")


def _np(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def _cell_pbc(data: Data) -> tuple[np.ndarray, np.ndarray]:
    cell = np.zeros((3, 3)) if getattr(data, "cell", None) is None else _np(data.cell).astype(np.float64).reshape(3, 3)
    pbc = np.zeros(3, bool) if getattr(data, "pbc", None) is None else _np(data.pbc).astype(bool).reshape(3)
    return cell, pbc


# ----------------------------------------------------------------------------------- ASE


def from_ase(
    atoms: Any,
    properties: bool = True,
    source: str | None = None,
    check_overlap: bool = True,
    dtype: torch.dtype | None = None,
) -> Data:
    """Convert an :class:`ase.Atoms` into a ``Data``.

    Args:
        atoms: the ASE structure; its cell (rows, Å) and pbc are kept as they are.
        properties: take ``energy`` (eV) and ``forces`` (eV/Å) from ``atoms.calc.results``
            when present (stored results only; no calculation is started). Forces are the
            stored ones, not ASE's ``get_forces()`` which zeroes them on fixed atoms.
        source: name for messages and ``data.source`` (default ``"ase.Atoms <formula>"``).
        check_overlap: reject atoms closer than 0.1 Å.
        dtype: float dtype of pos/cell/energy/forces.

    Tags (``atoms.get_tags()``, when set) become ``data.tags`` (long [N]); a ``FixAtoms``
    constraint becomes ``data.fixed`` (bool [N]); ``atoms.info["name"]`` becomes ``data.name``.
    """
    from ase import Atoms

    if not isinstance(atoms, Atoms):
        raise TypeError(f"from_ase expects an ase.Atoms, got {type(atoms).__name__}")
    src = source or f"ase.Atoms {atoms.get_chemical_formula()}"
    return to_data(ase_record(atoms, properties), src, check_overlap=check_overlap, dtype=dtype)


def ase_record(atoms: Any, properties: bool = True) -> Record:
    """The :class:`Record` of an ``ase.Atoms`` (see :func:`from_ase`)."""
    energy = forces = None
    if properties and atoms.calc is not None:
        results = getattr(atoms.calc, "results", {}) or {}
        if results.get("energy") is not None:
            energy = float(results["energy"])
        if results.get("forces") is not None:
            forces = np.asarray(results["forces"], dtype=np.float64)
    extra: dict[str, Any] = {"name": str(atoms.info.get("name", ""))}
    if atoms.has("tags"):
        extra["tags"] = torch.as_tensor(atoms.get_tags().astype(np.int64))
    fixed = _ase_fixed(atoms)
    if fixed is not None:
        extra["fixed"] = torch.as_tensor(fixed)
    return Record(
        z=np.asarray(atoms.numbers, dtype=np.int64),
        pos=np.asarray(atoms.positions, dtype=np.float64),
        cell=np.asarray(atoms.cell.array, dtype=np.float64),
        pbc=np.asarray(atoms.pbc, dtype=bool),
        energy=energy,
        forces=forces,
        extra=extra,
    )


def _ase_fixed(atoms: Any) -> np.ndarray | None:
    from ase.constraints import FixAtoms

    cons = [c for c in atoms.constraints if isinstance(c, FixAtoms)]
    if not cons:
        return None
    fixed = np.zeros(len(atoms), dtype=bool)
    for c in cons:
        fixed[c.get_indices()] = True
    return fixed


def to_ase(data: Data) -> Any:
    """Convert a ``Data`` back into an :class:`ase.Atoms`.

    Energy and forces (when present) go into a ``SinglePointCalculator``; ``tags`` into the
    atoms' tags; ``fixed`` into a ``FixAtoms`` constraint; ``name`` into ``atoms.info``.
    """
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms

    _single(data, "to_ase")
    cell, pbc = _cell_pbc(data)
    atoms = Atoms(
        numbers=_np(data.z).astype(int).reshape(-1),
        positions=_np(data.pos).astype(np.float64),
        cell=cell,
        pbc=pbc,
    )
    tags = getattr(data, "tags", None)
    if tags is not None:
        atoms.set_tags(_np(tags).astype(int).reshape(-1))
    fixed = getattr(data, "fixed", None)
    if fixed is not None:
        atoms.set_constraint(FixAtoms(mask=_np(fixed).astype(bool).reshape(-1)))
    name = getattr(data, "name", None)
    if name:
        atoms.info["name"] = str(name)
    results: dict[str, Any] = {}
    if getattr(data, "energy", None) is not None:
        results["energy"] = float(_np(data.energy).reshape(-1)[0])
    if getattr(data, "forces", None) is not None:
        results["forces"] = _np(data.forces).astype(np.float64)
    if results:
        atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


# ------------------------------------------------------------------------------ pymatgen


def from_pymatgen(
    obj: Any,
    source: str | None = None,
    check_overlap: bool = True,
    dtype: torch.dtype | None = None,
) -> Data:
    """Convert a pymatgen ``Structure`` (periodic) or ``Molecule`` into a ``Data``.

    The lattice matrix (rows, Å) becomes ``cell`` and ``lattice.pbc`` the periodic flags.
    Disordered structures (partial occupancies) raise a ``StructureError``; ions such as
    ``Fe2+`` count as their element. A ``selective_dynamics`` site property (from a POSCAR)
    becomes ``data.fixed`` (atoms with all three flags False). Site properties such as
    ``forces`` in Materials Project dictionaries are not read (they are often placeholders).
    """
    from pymatgen.core import IMolecule, IStructure

    if isinstance(obj, IStructure):
        kind = "Structure"
    elif isinstance(obj, IMolecule):
        kind = "Molecule"
    else:
        raise TypeError(f"from_pymatgen expects a pymatgen Structure or Molecule, got {type(obj).__name__}")
    src = source or f"pymatgen {kind} {obj.composition.formula.replace(' ', '')}"
    return to_data(pymatgen_record(obj, src), src, check_overlap=check_overlap, dtype=dtype)


def pymatgen_record(obj: Any, src: str) -> Record:
    """The :class:`Record` of a pymatgen Structure/Molecule (see :func:`from_pymatgen`);
    errors name ``src``."""
    from pymatgen.core import IStructure

    if not obj.is_ordered:
        i, site = next((i, s) for i, s in enumerate(obj) if not s.is_ordered)
        occ = ", ".join(f"{sp}:{amt:g}" for sp, amt in site.species.items())
        raise StructureError(f"{src}: partial occupancies are not supported (site {i}: {occ})")
    z = []
    for i, site in enumerate(obj):
        sp = site.specie
        zi = getattr(sp, "Z", 0)
        if not isinstance(zi, int) or zi < 1:
            raise StructureError(f"{src}: site {i} is not a chemical element ({sp})")
        z.append(zi)
    props = getattr(obj, "properties", None) or {}
    extra: dict[str, Any] = {"name": str(props.get("name", ""))}
    sd = obj.site_properties.get("selective_dynamics")
    if sd is not None and all(v is not None for v in sd):
        extra["fixed"] = torch.as_tensor(~np.asarray(sd, dtype=bool).reshape(len(z), -1).any(axis=1))
    cell = pbc = None
    if isinstance(obj, IStructure):
        pbc = np.asarray(getattr(obj.lattice, "pbc", (True, True, True)), dtype=bool)
        cell = np.asarray(obj.lattice.matrix, dtype=np.float64)
    return Record(
        z=np.asarray(z, dtype=np.int64),
        pos=np.asarray(obj.cart_coords, dtype=np.float64).reshape(len(z), 3),
        cell=cell,
        pbc=pbc,
        extra=extra,
    )


def to_pymatgen(data: Data) -> Any:
    """Convert a ``Data`` into a pymatgen ``Structure`` (any periodic direction) or ``Molecule``.

    Periodic data keep their lattice and pbc; a molecule (no periodic direction) becomes a
    ``Molecule``. Energy and forces are not carried (pymatgen structures hold geometry);
    ``fixed`` becomes the ``selective_dynamics`` site property.
    """
    from pymatgen.core import Lattice, Molecule, Structure

    _single(data, "to_pymatgen")
    cell, pbc = _cell_pbc(data)
    species = [CHEMICAL_SYMBOLS[int(zi)] for zi in _np(data.z).reshape(-1)]
    coords = _np(data.pos).astype(np.float64)
    site_props = None
    fixed = getattr(data, "fixed", None)
    if fixed is not None:
        f = _np(fixed).astype(bool).reshape(-1)
        site_props = {"selective_dynamics": [[not v] * 3 for v in f]}
    props = {"name": str(data.name)} if getattr(data, "name", None) else None
    if pbc.any():
        lattice = Lattice(cell, pbc=tuple(bool(p) for p in pbc))
        return Structure(
            lattice, species, coords, coords_are_cartesian=True, site_properties=site_props, properties=props
        )
    return Molecule(species, coords, site_properties=site_props, properties=props)


# --------------------------------------------------------------------------------- RDKit


@contextlib.contextmanager
def _rdkit_log() -> Iterator[list[str]]:
    """Capture RDKit's error log (newer RDKit) or silence it (older); yields a list that
    receives the captured lines (timestamps stripped) when the block ends."""
    from rdkit import rdBase

    out: list[str] = []
    if hasattr(rdBase, "CaptureErrorLog"):
        with rdBase.BlockLogs(), rdBase.CaptureErrorLog() as cap:  # warnings silenced, errors kept
            try:
                yield out
            finally:
                text = cap.messages or ""
                out.extend(_clean_log(text))
    else:  # pragma: no cover - RDKit < 2025
        with rdBase.BlockLogs():
            yield out


def _clean_log(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^\[\d\d:\d\d:\d\d\]\s*", "", line).strip()
        line = re.sub(r"^ERROR:\s*", "", line)
        if line and not set(line) <= set("~^ ") and "moving to the beginning of the next molecule" not in line:
            lines.append(line)
    return lines


def rdkit_reason(lines: list[str], default: str) -> str:
    """One concise reason from RDKit's log lines (the first error-like line)."""
    for line in lines:
        if "error" in line.lower() or "valence" in line.lower() or "kekulize" in line.lower():
            return line.replace("SMILES Parse Error: ", "")
    return lines[0] if lines else default


def from_rdkit(
    mol: Any,
    conf_id: int = -1,
    source: str | None = None,
    check_overlap: bool = True,
    dtype: torch.dtype | None = None,
) -> Data:
    """Convert an RDKit ``Mol`` with a 3D conformer into a ``Data`` (a molecule, no cell).

    Hydrogens are kept as they are in ``mol``: a molecule whose hydrogens are implicit
    (no coordinates) gives a warning; add them with ``Chem.AddHs(mol, addCoords=True)``.
    ``data.name`` is the ``_Name`` property (an SDF title), ``data.smiles`` RDKit's
    canonical SMILES (heavy-atom form) where it can be written.

    Raises:
        StructureError: no conformer, a 2D conformer, or a dummy atom (``*``).
    """
    from rdkit import Chem

    if mol is None:
        raise StructureError("from_rdkit got None (RDKit returns None for molecules it cannot parse)")
    if not isinstance(mol, Chem.Mol):
        raise TypeError(f"from_rdkit expects an RDKit Mol, got {type(mol).__name__}")
    name = mol.GetProp("_Name") if mol.HasProp("_Name") else ""
    src = source or name or f"RDKit Mol {_smiles_of(mol)}".strip()
    return to_data(rdkit_record(mol, src, conf_id), src, check_overlap=check_overlap, dtype=dtype)


def rdkit_record(mol: Any, src: str, conf_id: int = -1) -> Record:
    """The :class:`Record` of an RDKit Mol (see :func:`from_rdkit`); errors name ``src``."""
    if mol.GetNumAtoms() == 0:
        raise StructureError(f"{src}: empty structure (no atoms)")
    if mol.GetNumConformers() == 0:
        raise StructureError(
            f"{src}: molecule has no 3D conformer (a Mol made from SMILES has none); "
            "use from_smiles(...) or embed it with AllChem.EmbedMolecule(Chem.AddHs(mol))"
        )
    try:
        conf = mol.GetConformer(conf_id)
    except ValueError:
        raise StructureError(f"{src}: no conformer with id {conf_id} ({mol.GetNumConformers()} conformers)") from None
    if not conf.Is3D():
        raise StructureError(
            f"{src}: molecule has 2D coordinates only; 3D coordinates are needed "
            "(embed it with AllChem.EmbedMolecule or use from_smiles)"
        )
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    if (z == 0).any():
        i = int(np.flatnonzero(z == 0)[0])
        raise StructureError(f"{src}: atom {i} is a dummy atom ('*'), not a chemical element")
    n_implicit = _implicit_hs(mol)
    if n_implicit:
        warnings.warn(
            f"{src}: {n_implicit} implicit hydrogens have no coordinates and are left out; "
            "add them with Chem.AddHs(mol, addCoords=True)",
            stacklevel=3,
        )
    name = mol.GetProp("_Name") if mol.HasProp("_Name") else ""
    return Record(
        z=z,
        pos=np.asarray(conf.GetPositions(), dtype=np.float64).reshape(len(z), 3),
        extra={"name": name, "smiles": _smiles_of(mol)},
    )


def _smiles_of(mol: Any) -> str:
    from rdkit import Chem

    with _rdkit_log():
        try:
            return Chem.MolToSmiles(Chem.RemoveHs(mol, sanitize=False))
        except Exception:  # noqa: BLE001 - metadata only; unsanitisable molecules have none
            return ""


def _implicit_hs(mol: Any) -> int:
    try:
        return int(sum(a.GetNumImplicitHs() for a in mol.GetAtoms()))
    except Exception:  # noqa: BLE001 - property cache not computed (unsanitised mol)
        return 0


def from_smiles(
    smiles: str,
    seed: int = 0,
    optimize: bool = True,
    max_iters: int = 2000,
    check_overlap: bool = True,
    dtype: torch.dtype | None = None,
) -> Data:
    """3D structure of a SMILES string: add hydrogens, embed with ETKDG (seeded), optimise.

    Args:
        smiles: the SMILES string.
        seed: random seed of the ETKDG embedding (same seed, same geometry); it is RDKit's
            ``randomSeed``, so the geometry matches RDKit's for the same seed (RDKit's
            generator gives seeds 0 and 1 the same stream).
        optimize: relax with MMFF94 (UFF when MMFF lacks parameters; the ETKDG geometry
            when neither has them).
        max_iters: force-field iterations.

    ``data.source`` and ``data.smiles`` are the input SMILES; ``data.name`` is "".

    Raises:
        StructureError: ``invalid SMILES 'C1CC': unclosed ring for input: 'C1CC'``, or
            when no 3D embedding is found.
    """
    from rdkit import Chem
    from rdkit.Chem import AllChem

    if not isinstance(smiles, str) or not smiles.strip():
        raise StructureError(f"invalid SMILES {smiles!r}: empty")
    with _rdkit_log() as log:
        mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise StructureError(f"invalid SMILES {smiles!r}: {rdkit_reason(log, 'RDKit cannot parse it')}")
    if any(a.GetAtomicNum() == 0 for a in mol.GetAtoms()):
        raise StructureError(f"invalid SMILES {smiles!r}: dummy atoms ('*') have no 3D structure")
    mol = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed)
    params.numThreads = 1
    with _rdkit_log():
        status = AllChem.EmbedMolecule(mol, params)
        if status != 0:
            params.useRandomCoords = True
            status = AllChem.EmbedMolecule(mol, params)
    if status != 0:
        raise StructureError(f"{smiles}: could not generate 3D coordinates (ETKDG embedding failed)")
    if optimize:
        with _rdkit_log():
            if AllChem.MMFFHasAllMoleculeParams(mol):
                AllChem.MMFFOptimizeMolecule(mol, maxIters=max_iters)
            elif AllChem.UFFHasAllMoleculeParams(mol):
                AllChem.UFFOptimizeMolecule(mol, maxIters=max_iters)
    data = from_rdkit(mol, source=smiles, check_overlap=check_overlap, dtype=dtype)
    data.smiles = smiles
    return data


def to_rdkit(data: Data, bond_orders: bool = True, charge: int = 0) -> Any:
    """Convert a molecule ``Data`` into an RDKit ``Mol`` with one 3D conformer.

    Bonds are perceived from the geometry (``rdDetermineBonds``): with bond orders when
    ``bond_orders`` (needs the total ``charge``; falls back to connectivity only when the
    orders cannot be assigned), else connectivity only.

    Raises:
        ValueError: for periodic data (RDKit molecules have no cell).
    """
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds
    from rdkit.Geometry import Point3D

    _single(data, "to_rdkit")
    _, pbc = _cell_pbc(data)
    src = getattr(data, "source", None) or formula(data.z)
    if pbc.any():
        raise ValueError(f"{src}: to_rdkit needs a molecule; this structure is periodic (use to_pymatgen or to_ase)")
    rw = Chem.RWMol()
    for zi in _np(data.z).reshape(-1):
        rw.AddAtom(Chem.Atom(int(zi)))
    conf = Chem.Conformer(rw.GetNumAtoms())
    for i, (x, y, zc) in enumerate(_np(data.pos).astype(np.float64)):
        conf.SetAtomPosition(i, Point3D(float(x), float(y), float(zc)))
    conf.Set3D(True)
    rw.AddConformer(conf, assignId=True)
    mol = rw.GetMol()
    with _rdkit_log():
        try:
            if bond_orders:
                rdDetermineBonds.DetermineBonds(mol, charge=charge)
            else:
                rdDetermineBonds.DetermineConnectivity(mol)
        except Exception:  # noqa: BLE001 - orders not assignable: keep single-bond connectivity
            mol = rw.GetMol()
            rdDetermineBonds.DetermineConnectivity(mol)
    name = getattr(data, "name", None)
    if name:
        mol.SetProp("_Name", str(name))
    return mol
