"""``assert_periodic_invariant``: a crystal's predictions do not depend on how its infinite lattice
is written down (supercell, choice of unit cell, atoms wrapped across faces, rigid translation).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Batch, Data

from equiformer.data.contract import CHEMICAL_SYMBOLS, formula, make_data
from equiformer.testing._common import (
    BATCH_KEYS,
    Model,
    cast_data,
    eval_mode,
    fmt_array,
    is_index_key,
    make_generator,
    prepare_model,
    run_model,
    tolerance,
)

__all__ = ["assert_periodic_invariant", "DEFAULT_CHECKS", "DEFAULT_KINDS", "data_to_structure", "structure_to_data"]

logger = logging.getLogger(__name__)

#: every check, in the order they run
DEFAULT_CHECKS = ("supercell", "niggli", "lll", "unimodular", "wrap", "translate")

#: kind assumed for common output names when the caller does not declare one
DEFAULT_KINDS = {"energy": "extensive", "forces": "per_atom", "y": "intensive", "stress": "intensive"}

_KINDS = ("per_atom", "intensive", "extensive")

#: graph-level fields of the data contract (kept as they are when a cell is transformed)
_GRAPH_KEYS = ("y", "energy", "stress", "virial", "natoms", "charge", "spin")

_HINTS = {
    "supercell": (
        "a supercell is the same crystal: the model probably misses periodic images (a molecular neighbour list "
        "for a crystal, too few image shifts), or reads the cell size or the atom count"
    ),
    "reduction": (
        "a different unit cell of the same crystal changes the prediction: the model reads the cell vectors "
        "(lattice parameters as features) or misses images that a skewed cell needs"
    ),
    "wrap": (
        "moving atoms by lattice vectors changes the prediction: the model uses Cartesian positions without "
        "periodic images (or wraps them inconsistently)"
    ),
    "translate": (
        "a rigid translation changes the prediction: the model depends on absolute positions (fix this first: "
        "every other check also moves atoms)"
    ),
}


# ----------------------------------------------------------------------------- conversions


def data_to_structure(data: Data) -> Any:
    """A pymatgen ``Structure`` of a single periodic ``Data`` (positions as given, not wrapped)."""
    from pymatgen.core import Lattice, Structure

    cell = data.cell.detach().reshape(3, 3).to(torch.float64).cpu().numpy()
    pbc = tuple(bool(p) for p in data.pbc.reshape(3).tolist())
    species = [CHEMICAL_SYMBOLS[int(z)] for z in data.z.tolist()]
    pos = data.pos.detach().to(torch.float64).cpu().numpy()
    return Structure(Lattice(cell, pbc=pbc), species, pos, coords_are_cartesian=True, to_unit_cell=False)


def structure_to_data(structure: Any, template: Data, atom_map: np.ndarray, source: str) -> Data:
    """A ``Data`` of ``structure`` (via ``make_data``) with the other fields of ``template``:
    per-node fields re-indexed by ``atom_map`` (new atom k is template atom ``atom_map[k]``),
    graph-level fields copied; index/edge fields (a precomputed graph) are dropped."""
    out = make_data(
        z=np.array(structure.atomic_numbers),
        pos=np.array(structure.cart_coords),
        cell=np.array(structure.lattice.matrix),
        pbc=template.pbc.reshape(3).cpu().numpy(),
        source=source,
        check_overlap=False,
        dtype=template.pos.dtype,
    )
    n = template.pos.shape[0]
    index = torch.as_tensor(atom_map, dtype=torch.long)
    for key in template.keys():
        if key in ("z", "pos", "cell", "pbc", "source") or key in BATCH_KEYS or is_index_key(key) or "edge" in key:
            continue
        value = template[key]
        per_node = torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == n
        if per_node and (n > 1 or key not in _GRAPH_KEYS):
            out[key] = value[index.to(value.device)]
        else:
            out[key] = value
    return out.to(template.pos.device)


def _map_atoms(new_pos: np.ndarray, new_z: np.ndarray, data: Data) -> np.ndarray:
    """For each new atom, the index of the original atom at the same place modulo the original lattice."""
    cell = data.cell.detach().reshape(3, 3).to(torch.float64).cpu().numpy()
    pbc = data.pbc.reshape(3).cpu().numpy().astype(bool)
    pos = data.pos.detach().to(torch.float64).cpu().numpy()
    inv = np.linalg.inv(cell)
    diff = (new_pos @ inv)[:, None, :] - (pos @ inv)[None, :, :]
    diff[..., pbc] -= np.round(diff[..., pbc])
    dist = np.linalg.norm(diff @ cell, axis=-1)
    match = dist.argmin(axis=1)
    best = dist[np.arange(len(new_pos)), match]
    z = data.z.cpu().numpy()
    if (best > 1e-4).any() or (z[match] != new_z).any():
        k = int(np.argmax(best))
        raise RuntimeError(
            f"assert_periodic_invariant: internal error mapping atoms of a transformed cell back to the input "
            f"(atom {k} is {best[k]:.2e} Å from its nearest equivalent)"
        )
    return match


# ----------------------------------------------------------------------------- transformations


@dataclass
class _Variant:
    """One transformed description of the crystal."""

    check: str
    description: str
    data: Data
    atom_map: np.ndarray  # new atom k <- original atom atom_map[k]
    n_cells: int
    trivial: bool = False
    notes: list[str] = field(default_factory=list)


def _parse_supercell(spec: Any) -> np.ndarray:
    m = np.asarray(spec)
    if m.shape == (3,):
        m = np.diag(m)
    if m.shape != (3, 3) or not np.allclose(m, np.round(m)) or abs(round(np.linalg.det(m))) < 1:
        raise ValueError(f"supercell {spec!r} must be 3 positive integers or a non-singular integer 3x3 matrix")
    return np.round(m).astype(int)


def _random_unimodular(pbc: np.ndarray, rng: torch.Generator) -> np.ndarray:
    """A random integer matrix with det +1 (lower x upper unitriangular, entries in {-1, 0, 1}),
    acting only on periodic directions; never the identity when two directions are periodic."""
    periodic = np.flatnonzero(pbc)
    if len(periodic) < 2:
        return np.eye(3, dtype=int)
    for _ in range(100):
        lower, upper = np.eye(3, dtype=int), np.eye(3, dtype=int)
        for a in periodic:
            for b in periodic:
                if a > b:
                    lower[a, b] = int(torch.randint(-1, 2, (1,), generator=rng))
                elif a < b:
                    upper[a, b] = int(torch.randint(-1, 2, (1,), generator=rng))
        m = lower @ upper
        if not np.array_equal(m, np.eye(3, dtype=int)):
            return m
    return np.eye(3, dtype=int)


def _variant_from_structure(check: str, description: str, structure: Any, data: Data, source: str) -> _Variant:
    old = data.cell.detach().reshape(3, 3).to(torch.float64).cpu().numpy()
    new = structure.lattice.matrix
    n_cells = int(round(abs(np.linalg.det(new)) / abs(np.linalg.det(old))))
    atom_map = _map_atoms(structure.cart_coords, np.asarray(structure.atomic_numbers), data)
    variant = _Variant(check, description, structure_to_data(structure, data, atom_map, source), atom_map, n_cells)
    variant.trivial = n_cells == 1 and np.allclose(new, old, atol=1e-8)
    return variant


def _variants(data: Data, checks: Sequence[str], supercells: Sequence[Any], gen: torch.Generator) -> list[_Variant]:
    from pymatgen.core import Lattice, Structure

    pbc = data.pbc.reshape(3).cpu().numpy().astype(bool)
    cell = data.cell.detach().reshape(3, 3).to(torch.float64).cpu().numpy()
    source = str(getattr(data, "source", None) or formula(data.z.cpu().numpy()))
    structure = data_to_structure(data)
    n = data.pos.shape[0]
    out: list[_Variant] = []
    for check in checks:
        if check == "supercell":
            for spec in supercells:
                m = _parse_supercell(spec)
                if (m[~pbc] != np.eye(3, dtype=int)[~pbc]).any():
                    m[~pbc] = np.eye(3, dtype=int)[~pbc]  # never replicate along a non-periodic direction
                sc = structure.make_supercell(m, in_place=False)
                label = "x".join(str(v) for v in np.diag(m)) if (m == np.diag(np.diag(m))).all() else m.tolist()
                desc = f"{label} supercell (S = {m.tolist()}, {n} -> {len(sc)} atoms)"
                out.append(_variant_from_structure(check, desc, sc, data, f"{source} [{label} supercell]"))
        elif check in ("niggli", "lll"):
            if not pbc.all():
                logger.info("%s: skipped for %s (pbc %s is not fully periodic)", check, source, pbc.tolist())
                continue
            reduced = structure.get_reduced_structure("niggli" if check == "niggli" else "LLL")
            m = reduced.lattice.matrix @ np.linalg.inv(cell)
            if not np.allclose(m, np.round(m), atol=1e-6) or abs(abs(np.linalg.det(m)) - 1) > 1e-6:
                raise RuntimeError(f"pymatgen's {check} reduction rotated the lattice (M = {m.round(4).tolist()})")
            desc = f"{check} reduced cell (new lattice = M @ old, M = {np.round(m).astype(int).tolist()})"
            variant = _variant_from_structure(check, desc, reduced, data, f"{source} [{check} cell]")
            if variant.trivial:
                logger.info("%s: the input cell of %s is already reduced; only the wrapping is tested", check, source)
            out.append(variant)
        elif check == "unimodular":
            m = _random_unimodular(pbc, gen)
            skewed = Structure(
                Lattice(m @ cell, pbc=tuple(pbc.tolist())),
                structure.species,
                structure.cart_coords,
                coords_are_cartesian=True,
                to_unit_cell=True,
            )
            desc = f"equivalent skewed cell (new lattice = U @ old, U = {m.tolist()}, det +1)"
            out.append(_variant_from_structure(check, desc, skewed, data, f"{source} [skewed cell]"))
        elif check == "wrap":
            shifts = torch.randint(-1, 2, (n, 3), generator=gen) * torch.as_tensor(pbc, dtype=torch.long)
            if not shifts.any() and pbc.any():
                shifts[0, int(np.flatnonzero(pbc)[0])] = 1
            moved = copy.copy(data)
            moved.pos = data.pos + (shifts.to(torch.float64) @ torch.as_tensor(cell)).to(data.pos)
            shown = ", ".join(f"atom {i}: {shifts[i].tolist()}" for i in range(min(n, 4)))
            desc = f"atoms moved by integer lattice vectors ({shown}{', ...' if n > 4 else ''})"
            out.append(_Variant(check, desc, moved, np.arange(n), 1))
        elif check == "translate":
            t = torch.randn(3, dtype=torch.float64, generator=gen) * 3.0
            moved = copy.copy(data)
            moved.pos = data.pos + t.to(data.pos)
            out.append(_Variant(check, f"rigid translation by {fmt_array(t)} Å", moved, np.arange(n), 1))
        else:
            raise ValueError(f"unknown periodic check {check!r}; choose from {DEFAULT_CHECKS}")
    return out


# ----------------------------------------------------------------------------- comparison


def _kinds(
    ref: Mapping[str, torch.Tensor],
    outputs: Sequence[str] | Mapping[str, str] | None,
    per_atom: Sequence[str] | None,
    intensive: Sequence[str] | None,
    extensive: Sequence[str] | None,
    num_nodes: int,
) -> dict[str, str]:
    declared: dict[str, str] = {}
    for kind, names in (("per_atom", per_atom), ("intensive", intensive), ("extensive", extensive)):
        for name in names or ():
            declared[name] = kind
    if isinstance(outputs, Mapping):
        declared.update(dict(outputs))
    if outputs is not None:
        names = list(outputs)
    elif declared:
        names = list(declared)
    else:
        names = list(ref)
    missing = [n for n in names if n not in ref]
    if missing:
        raise ValueError(f"the model returned no output named {missing}; it returned {sorted(ref)}")
    kinds = {}
    for name in names:
        kind = declared.get(name) or DEFAULT_KINDS.get(name)
        if kind is None:
            value = ref[name]
            kind = "per_atom" if value.dim() >= 1 and value.shape[0] == num_nodes and num_nodes > 1 else "intensive"
        if kind not in _KINDS:
            raise ValueError(f"output {name!r}: kind must be one of {_KINDS}, got {kind!r}")
        kinds[name] = kind
    return kinds


@dataclass
class _Failure:
    variant: _Variant
    name: str
    kind: str
    max_err: float
    tol: float
    detail: str


def _compare(
    name: str, kind: str, ref: torch.Tensor, got: torch.Tensor | None, v: _Variant, data: Data, atol: float, rtol: float
) -> tuple[float, _Failure | None]:
    if got is None:
        return float("inf"), _Failure(v, name, kind, float("inf"), 0.0, "missing from the outputs")
    ref = ref.to(torch.float64)
    got = got.to(torch.float64)
    if kind == "per_atom":
        expected = ref[torch.as_tensor(v.atom_map, device=ref.device)]
    elif kind == "extensive":
        expected = ref * v.n_cells
    else:
        expected = ref
    if got.shape != expected.shape:
        detail = f"has shape {tuple(got.shape)}, expected {tuple(expected.shape)} (declared {kind})"
        return float("inf"), _Failure(v, name, kind, float("inf"), 0.0, detail)
    err = (got - expected).abs()
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    max_err = float(err.max()) if err.numel() else 0.0
    tol = atol + rtol * float(expected.abs().max() if expected.numel() else 0.0)
    if max_err <= tol:
        return max_err, None
    flat = int(err.argmax())
    if kind == "per_atom":
        width = max(1, err[0].numel())
        k, comp = divmod(flat, width)
        j = int(v.atom_map[k])
        element = CHEMICAL_SYMBOLS[int(data.z[j])]
        detail = f"at atom {k} (copy of input atom {j}, {element})"
        g, e = got[k].flatten(), expected[k].flatten()
    else:
        detail, comp = "", flat
        g, e = got.flatten(), expected.flatten()
    if g.numel() <= 9:
        detail += f"{', ' if detail else ''}got {fmt_array(g)}, expected {fmt_array(e)}"
    else:
        detail += f"{', ' if detail else ''}component {comp}: got {float(g[comp]):.6g}, expected {float(e[comp]):.6g}"
    if kind != "per_atom" and v.n_cells > 1 and float(ref.abs().max()) > 0:
        ratio = float((got.flatten() @ ref.flatten()) / (ref.flatten() @ ref.flatten()))
        if kind == "intensive" and abs(ratio - v.n_cells) < 1e-6 * v.n_cells:
            detail += f" -- it scales with the number of cells ({v.n_cells}): declare it extensive"
        elif kind == "extensive" and abs(ratio - 1) < 1e-6:
            detail += " -- it does not change with the number of cells: declare it intensive"
    return max_err, _Failure(v, name, kind, max_err, tol, detail)


def assert_periodic_invariant(
    model: Model,
    data: Data,
    outputs: Sequence[str] | Mapping[str, str] | None = None,
    *,
    per_atom: Sequence[str] | None = None,
    intensive: Sequence[str] | None = None,
    extensive: Sequence[str] | None = None,
    checks: Sequence[str] = DEFAULT_CHECKS,
    supercells: Sequence[Any] = ((2, 1, 1), (2, 2, 2)),
    atol: float | None = None,
    rtol: float | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Assert that a crystal's predictions do not depend on the description of its lattice.

    Checks (``checks``; every one by default):

    - ``"supercell"``: each of ``supercells`` (3 integers or an integer 3x3 matrix S, new
      lattice = S @ cell, built by pymatgen): per-atom outputs equal those of the atom each
      replica copies, intensive outputs equal, extensive outputs scale by ``|det S|``;
    - ``"niggli"``, ``"lll"``: pymatgen's ``get_reduced_structure`` (same crystal, other cell,
      atoms wrapped into it; matched back by fractional coordinates);
    - ``"unimodular"``: a random skewed cell U @ cell with integer U, det +1 (always a
      different cell, also when the input is already reduced);
    - ``"wrap"``: atoms moved by random integer lattice vectors (across the cell faces);
    - ``"translate"``: a rigid translation of all atoms.

    Args:
        model: ``model(data) -> dict[str, Tensor]``; an ``nn.Module`` runs in eval mode.
        data: a periodic ``Data`` or a ``Batch`` of them (checked one structure at a time, each
            passed to the model as a one-graph ``Batch`` when ``data`` is a ``Batch``).
        outputs: names to check, or a dict name -> "per_atom" | "intensive" | "extensive".
            Default: all outputs, kinds from the lists below, :data:`DEFAULT_KINDS` ("energy"
            extensive, "forces" per-atom, "y" intensive), else per-atom when the leading
            dimension is the number of atoms and intensive otherwise.
        per_atom, intensive, extensive: output names of each kind.
        supercells: supercell specifications for the "supercell" check.
        atol, rtol: tolerance ``atol + rtol * max|expected|``; default by dtype (float64 1e-10
            and 1e-10, float32 1e-5 and 1e-5).
        dtype: cast a copy of the model and the data first (the caller's model is not modified).
        seed, generator: randomness of the "unimodular", "wrap" and "translate" checks.

    Returns:
        ``{"<check>/<output>": max abs error}`` (max over structures and supercells).

    Raises:
        AssertionError: naming the check and the transformed cell, each failing output, its
            kind, max error and where, and a likely cause.
        ValueError: a non-periodic structure, an unknown check or output.
    """
    __tracebackhide__ = True
    model = prepare_model(model, dtype)
    data = cast_data(data, dtype)
    atol_, rtol_ = tolerance(data.pos.dtype, atol, rtol)
    gen = make_generator(seed, generator)
    as_batch = isinstance(data, Batch)
    structures = data.to_data_list() if as_batch else [data]
    report: dict[str, float] = {}
    failures: list[tuple[int, _Failure]] = []

    def call(d: Data) -> dict[str, torch.Tensor]:
        return run_model(model, Batch.from_data_list([d]) if as_batch else d)

    with eval_mode(model):
        for index, d in enumerate(structures):
            pbc = d.pbc.reshape(3).bool()
            if not pbc.any():
                src = getattr(d, "source", None) or formula(d.z.cpu().numpy())
                raise ValueError(
                    f"assert_periodic_invariant: structure {index} ({src}) is not periodic (pbc all False)"
                )
            ref = call(d)
            kinds = _kinds(ref, outputs, per_atom, intensive, extensive, d.pos.shape[0])
            for v in _variants(d, checks, supercells, gen):
                new = call(v.data)
                for name, kind in kinds.items():
                    err, failure = _compare(name, kind, ref[name], new.get(name), v, d, atol_, rtol_)
                    key = f"{v.check}/{name}"
                    report[key] = max(report.get(key, 0.0), err)
                    if failure is not None:
                        failures.append((index, failure))
    if failures:
        raise AssertionError(_message(failures, structures, data.pos.dtype, atol_, rtol_))
    return report


def _message(
    failures: list[tuple[int, _Failure]], structures: list[Data], dtype: torch.dtype, atol: float, rtol: float
) -> str:
    checks: dict[str, None] = {}
    for _, f in failures:
        checks.setdefault(f.variant.check, None)
    lines = [
        f"assert_periodic_invariant: predictions depend on how the crystal is described "
        f"({str(dtype).replace('torch.', '')}, tolerance {atol:g} + {rtol:g} * max|expected|)",
        f"failed checks: {', '.join(checks)}",
        "likely cause:",
    ]
    hint_keys: dict[str, None] = {}
    if "translate" in checks:  # every other check moves atoms too: fix this one first
        hint_keys["translate"] = None
    for c in checks:
        hint_keys.setdefault("reduction" if c in ("niggli", "lll", "unimodular") else c, None)
    lines.extend(f"  {k}: {_HINTS[k]}" for k in hint_keys)
    lines.append("details (at most 3 outputs for each of the first 4 failing cells):")
    by_variant: dict[int, list[tuple[int, _Failure]]] = {}
    for index, f in failures:
        by_variant.setdefault(id(f.variant), []).append((index, f))
    for group in list(by_variant.values())[:4]:
        index, first = group[0]
        src = getattr(structures[index], "source", None) or formula(structures[index].z.cpu().numpy())
        lines.append(f"  {first.variant.check} on structure {index} ({src}): {first.variant.description}")
        ranked = sorted(group, key=lambda item: item[1].max_err / max(item[1].tol, 1e-300), reverse=True)
        for _, f in ranked[:3]:
            lines.append(f"    {f.name!r} ({f.kind}): max error {f.max_err:.3e} > tolerance {f.tol:.3e}; {f.detail}")
        if len(ranked) > 3:
            lines.append(f"    ... and {len(ranked) - 3} more outputs: {[f.name for _, f in ranked[3:]]}")
    if len(by_variant) > 4:
        lines.append(f"  ... and {len(by_variant) - 4} more failing cells")
    return "\n".join(lines)
