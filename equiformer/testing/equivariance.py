"""``assert_equivariant``: outputs transform correctly under rotation, reflection, translation and
atom permutation of the input structure.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from e3nn import o3
from torch_geometric.data import Data

from equiformer.testing._common import (
    Model,
    cast_data,
    classify_leading,
    eval_mode,
    float_dtype,
    fmt_array,
    graph_info,
    is_index_key,
    make_generator,
    node_keys,
    prepare_model,
    run_model,
    tolerance,
)
from equiformer.testing.rotations import random_orthogonal, random_reflection, random_rotation

__all__ = ["assert_equivariant", "DEFAULT_IRREPS", "CARTESIAN"]

#: spec of a rank-2 Cartesian tensor output (stress, virial, polarisability): T -> R T R^T
CARTESIAN = "cartesian"

#: irreps assumed for common output names when the caller does not declare them
#: ("0e" on an output with T scalars per row means T x 0e, see ``assert_equivariant``)
DEFAULT_IRREPS: dict[str, str] = {
    "energy": "0e",
    "y": "0e",
    "forces": "1o",
    "stress": CARTESIAN,
    "virial": CARTESIAN,
}

_HINTS = {
    "rotation": (
        "changes under a proper rotation about the origin: the model reads a direction-dependent quantity "
        "(raw coordinates, a fixed axis, an unrotated input field), or the declared irreps of the output are wrong"
    ),
    "reflection": (
        "passes proper rotations but not the reflection (det -1): the output's parity is wrong, e.g. a "
        "pseudovector (cross product, '1e') returned where '1o' is declared, or the reverse; if the model is "
        "meant to be only SE(3)-equivariant, call with parity=False ('SE(3)')"
    ),
    "translation": (
        "changes under a rigid translation: the model depends on absolute positions (|pos|, pos as a feature, "
        "a fixed origin); only relative vectors pos_j - pos_i are translation invariant"
    ),
    "permutation": (
        "changes when atoms are re-ordered: the model depends on atom order (the atom index as a feature, an "
        "order-dependent readout, per-atom outputs not returned in input order)"
    ),
    "combined": (
        "each transformation passes alone but their composition fails: look for a transformation applied "
        "in the wrong order, or an input field that is rotated/permuted inconsistently"
    ),
}


@dataclass
class _Transform:
    """pos' = (pos @ R.T + t[batch])[perm]; i.e. new atom k is old atom perm[k]."""

    name: str
    R: torch.Tensor  # [3, 3] float64
    t: torch.Tensor  # [B, 3] float64
    perm: torch.Tensor | None  # [N] long

    def describe(self) -> str:
        parts = []
        if not torch.equal(self.R, torch.eye(3, dtype=self.R.dtype)):
            det = float(torch.linalg.det(self.R))
            parts.append(f"R = {fmt_array(self.R)} (det {det:+.0f})")
        if bool(self.t.abs().max() > 0):
            more = f" (graph 0 of {len(self.t)})" if len(self.t) > 1 else ""
            parts.append(f"translation t = {fmt_array(self.t[0])} Å{more}")
        if self.perm is not None:
            parts.append(f"permutation (new atom k = old atom perm[k]) perm = {fmt_array(self.perm)}")
        return "; ".join(parts) if parts else "identity"


@dataclass
class _OutputSpec:
    name: str
    spec: str  # irreps string or CARTESIAN
    kind: str  # "atom" or "graph"
    copies: int  # repetitions of the irreps in one row
    dim: int  # dimension of one copy

    def label(self) -> str:
        spec = self.spec if self.copies == 1 else f"{self.copies}x({self.spec})"
        return f"{spec}, per-{self.kind}"


def _parity_flag(parity: bool | str) -> bool:
    if isinstance(parity, str):
        key = parity.strip().upper()
        if key in ("E(3)", "O(3)", "E3", "O3"):
            return True
        if key in ("SE(3)", "SO(3)", "SE3", "SO3"):
            return False
        raise ValueError(f"parity must be True/False, 'E(3)' or 'SE(3)', got {parity!r}")
    return bool(parity)


def _spec_dim(spec: str) -> int:
    return 9 if spec == CARTESIAN else o3.Irreps(spec).dim


def _build_specs(
    ref: Mapping[str, torch.Tensor],
    outputs: Sequence[str] | Mapping[str, str] | None,
    irreps: Mapping[str, str] | None,
    per_atom: Sequence[str] | None,
    num_nodes: int,
    num_graphs: int,
) -> list[_OutputSpec]:
    declared: dict[str, str] = {}
    declared.update({k: str(v) for k, v in (irreps or {}).items()})
    if isinstance(outputs, Mapping):
        declared.update({k: str(v) for k, v in outputs.items()})
    if outputs is not None:
        names = list(outputs.keys() if isinstance(outputs, Mapping) else outputs)
    elif irreps is not None:
        names = list(irreps.keys())
    else:
        names = list(ref.keys())
    missing = [n for n in names if n not in ref]
    if missing:
        raise ValueError(f"the model returned no output named {missing}; it returned {sorted(ref)}")
    undeclared = [n for n in names if n not in declared and n not in DEFAULT_IRREPS]
    if undeclared:
        raise ValueError(
            f"no irreps declared for outputs {undeclared}: pass irreps={{name: 'e.g. 1o or 4x0e+2x1o'}} for them, "
            f"or restrict the check with outputs=[...]"
        )
    atom_names = set(per_atom or ())
    specs = []
    for name in names:
        spec = declared.get(name, DEFAULT_IRREPS.get(name))
        value = ref[name]
        kind = "atom" if name in atom_names else classify_leading(value, name, num_nodes, num_graphs)
        lead = num_nodes if kind == "atom" else num_graphs
        dim = _spec_dim(spec)
        if value.numel() % max(lead * dim, 1) != 0 or value.numel() == 0:
            raise ValueError(
                f"output {name!r} has shape {tuple(value.shape)}, which is not {lead} rows of a multiple of "
                f"{spec!r} (dimension {dim}); check the irreps declared for it"
            )
        specs.append(_OutputSpec(name, spec, kind, value.numel() // (lead * dim), dim))
    return specs


def _random_perm(batch: torch.Tensor, num_graphs: int, gen: torch.Generator) -> torch.Tensor | None:
    """A permutation of the atoms within each graph (not the identity where avoidable)."""
    n = len(batch)
    if n == 0 or all(int((batch == g).sum()) < 2 for g in range(num_graphs)):
        return None
    perm = torch.arange(n)
    for g in range(num_graphs):
        idx = (batch.cpu() == g).nonzero().flatten()
        if len(idx) < 2:
            continue
        for _ in range(10):
            p = torch.randperm(len(idx), generator=gen)
            if not torch.equal(p, torch.arange(len(idx))):
                break
        perm[idx] = idx[p]
    return perm


def _apply(
    data: Data,
    tr: _Transform,
    batch: torch.Tensor,
    num_nodes: int,
    input_irreps: Mapping[str, str],
) -> Data:
    out = copy.copy(data)
    dtype, device = data.pos.dtype, data.pos.device
    R = tr.R.to(dtype=dtype, device=device)
    out.pos = data.pos @ R.T + tr.t.to(dtype=dtype, device=device)[batch]
    if getattr(data, "cell", None) is not None:
        out.cell = data.cell @ R.T
    for key, spec in input_irreps.items():
        value = data[key]
        D = _matrix(spec, tr.R).to(dtype=value.dtype, device=device)
        if spec == CARTESIAN:
            rows = value.reshape(-1, 3, 3)
            out[key] = (R @ rows @ R.T).reshape(value.shape)
        else:
            out[key] = (value.reshape(-1, D.shape[0]) @ D.T).reshape(value.shape)
    if tr.perm is not None:
        perm = tr.perm.to(device)
        for key in node_keys(out, num_nodes):
            out[key] = out[key][perm]
        inverse = torch.argsort(perm)
        for key in list(out.keys()):
            value = out[key]
            if is_index_key(key) and torch.is_tensor(value) and not value.is_floating_point():
                out[key] = inverse[value]
    return out


def _matrix(spec: str, R: torch.Tensor) -> torch.Tensor:
    """The representation matrix of ``spec`` at R (float64); for CARTESIAN, R itself."""
    if spec == CARTESIAN:
        return R
    # e3nn builds its so(3) generators in the default dtype: float32 ones would limit D to ~1e-7
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return o3.Irreps(spec).D_from_matrix(R.to(torch.float64))
    finally:
        torch.set_default_dtype(previous)


def _expected(ref: torch.Tensor, s: _OutputSpec, tr: _Transform, lead: int) -> torch.Tensor:
    """Rows [lead, copies, dim] that the transformed output must equal."""
    rows = ref.to(torch.float64).reshape(lead, s.copies, s.dim)
    R = tr.R.to(device=ref.device)
    if s.spec == CARTESIAN:
        t = rows.reshape(lead, s.copies, 3, 3)
        rows = (R @ t @ R.T).reshape(lead, s.copies, 9)
    else:
        rows = rows @ _matrix(s.spec, tr.R).to(device=ref.device).T
    if s.kind == "atom" and tr.perm is not None:
        rows = rows[tr.perm.to(ref.device)]
    return rows


@dataclass
class _Failure:
    """The comparison of one output under one transformation."""

    name: str
    label: str
    transform: _Transform
    max_err: float = 0.0
    tol: float = 0.0
    where: str = ""
    got: str = ""
    expected: str = ""
    scale: float = 0.0
    problem: str = ""
    trial: int = 0

    @property
    def ok(self) -> bool:
        return not self.problem and self.max_err <= self.tol

    def line(self) -> str:
        if self.problem:
            return f"{self.name!r} ({self.label}): {self.problem}"
        return (
            f"{self.name!r} ({self.label}): max error {self.max_err:.3e} > tolerance {self.tol:.3e} at {self.where}: "
            f"got {self.got}, expected {self.expected} (max|output| {self.scale:.3e})"
        )


def _draw_transforms(
    gen: torch.Generator,
    num_graphs: int,
    batch: torch.Tensor,
    parity: bool,
    rotation: bool,
    translation: bool,
    permutation: bool,
    translation_scale: float,
) -> list[_Transform]:
    """Each enabled transformation alone, then all of them composed."""
    zero_t = torch.zeros(num_graphs, 3, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    trs: list[_Transform] = []
    if rotation:
        trs.append(_Transform("rotation", random_rotation(generator=gen), zero_t, None))
        if parity:
            trs.append(_Transform("reflection", random_reflection(generator=gen), zero_t, None))
    t = torch.randn(num_graphs, 3, dtype=torch.float64, generator=gen) * translation_scale
    if translation:
        trs.append(_Transform("translation", eye, t, None))
    perm = _random_perm(batch, num_graphs, gen) if permutation else None
    if perm is not None:
        trs.append(_Transform("permutation", eye, zero_t, perm))
    if len(trs) > 1:
        if rotation:
            R = random_orthogonal(generator=gen) if parity else random_rotation(generator=gen)
        else:
            R = eye
        trs.append(_Transform("combined", R, t if translation else zero_t, perm))
    return trs


def _compare(
    s: _OutputSpec,
    ref: torch.Tensor,
    got: torch.Tensor | None,
    tr: _Transform,
    num_nodes: int,
    num_graphs: int,
    atol: float,
    rtol: float,
) -> _Failure:
    f = _Failure(s.name, s.label(), tr)
    if got is None:
        f.problem = f"missing from the outputs after the {tr.name}"
        return f
    if got.numel() != ref.numel():
        f.problem = f"changed shape from {tuple(ref.shape)} to {tuple(got.shape)} under the {tr.name}"
        return f
    lead = num_nodes if s.kind == "atom" else num_graphs
    expected = _expected(ref, s, tr, lead)
    got_rows = got.to(torch.float64).reshape(lead, s.copies, s.dim)
    err = (got_rows - expected).abs()
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    f.max_err = float(err.max())
    f.scale = float(ref.abs().max())
    f.tol = atol + rtol * f.scale
    if f.max_err > f.tol:
        row, copy_, comp = (int(v) for v in torch.unravel_index(err.argmax(), err.shape))
        f.where = f"{s.kind} {row}" + (f", copy {copy_}" if s.copies > 1 else "") + f", component {comp}"
        if s.dim <= 9:
            f.got, f.expected = fmt_array(got_rows[row, copy_]), fmt_array(expected[row, copy_])
        else:
            f.got, f.expected = f"{float(got_rows[row, copy_, comp]):.6g}", f"{float(expected[row, copy_, comp]):.6g}"
    return f


def assert_equivariant(
    model: Model,
    data: Data,
    outputs: Sequence[str] | Mapping[str, str] | None = None,
    irreps: Mapping[str, str] | None = None,
    *,
    parity: bool | str = True,
    rotation: bool = True,
    translation: bool = True,
    permutation: bool = True,
    per_atom: Sequence[str] | None = None,
    input_irreps: Mapping[str, str] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    n_trials: int = 2,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    translation_scale: float = 3.0,
) -> dict[str, float]:
    """Assert that ``model(data)`` is E(3)- (or SE(3)-) and permutation-equivariant.

    Each trial applies, separately and then all together, to ``data.pos`` (and ``data.cell``):
    a Haar-random proper rotation about the origin; a random reflection (det -1, when
    ``parity``); a random rigid translation per graph (normal, ``translation_scale`` Å); a
    random permutation of the atoms within each graph. A permutation re-orders every per-node
    tensor field (first dim == num_nodes: z, pos, forces, batch, tags, ...) and relabels
    index fields (``*index*``). Each output must then equal ``D(R) @ output`` (e3nn's
    ``Irreps.D_from_matrix``, parity included), re-ordered for per-atom outputs.

    Args:
        model: callable ``model(data) -> dict[str, Tensor]``; an ``nn.Module`` runs in eval mode.
        data: a PyG ``Data`` (one structure) or ``Batch``; passed to the model as given, transformed.
        outputs: names of outputs to check, or a dict name -> irreps. Default: the keys of
            ``irreps`` if given, else every output of the model.
        irreps: e3nn irreps of each output's last dimension, e.g. ``{"energy": "0e", "y": "12x0e",
            "forces": "1o", "dipole": "1o"}``; ``"cartesian"`` for a rank-2 Cartesian tensor
            [..., 3, 3] (stress). An output row that holds k copies of the declared irreps (e.g.
            "0e" for [B, 12]) is read as k x irreps. Defaults: :data:`DEFAULT_IRREPS`.
        parity: True or "E(3)": also test reflections; False or "SE(3)": proper rotations only.
        rotation, translation, permutation: which transformations to test.
        per_atom: outputs to treat as per-atom even if their leading dim is ambiguous
            (otherwise: leading dim == num_nodes means per-atom, == num_graphs per-graph).
        input_irreps: further input fields of ``data`` to rotate with the structure, name -> irreps
            (e.g. ``{"magmom": "1e"}``); ``pos`` and ``cell`` are always rotated.
        atol, rtol: tolerance ``atol + rtol * max|output|`` per output; default by dtype
            (float64: 1e-10 and 1e-10; float32: 1e-5 and 1e-5).
        n_trials: number of random draws of each transformation.
        dtype: cast a copy of the model and the data's floating fields to this dtype first
            (e.g. ``torch.float64``); the caller's model is not modified.
        seed, generator: randomness of the transformations (reproducible by default).
        translation_scale: standard deviation of the random translation, Å.

    Returns:
        ``{"<transformation>/<output>": max abs error}`` over all trials.

    Raises:
        AssertionError: naming each failing transformation and output, its max error, where it
            occurred, the tolerance, the transformation (R, t, perm) and a likely cause.
        ValueError: an output that is missing, undeclared, or whose shape does not fit its irreps.
    """
    __tracebackhide__ = True
    do_parity = _parity_flag(parity)
    gen = make_generator(seed, generator)
    model = prepare_model(model, dtype)
    data = cast_data(data, dtype)
    fdtype = float_dtype(data)
    atol_, rtol_ = tolerance(fdtype, atol, rtol)
    num_nodes, num_graphs, batch = graph_info(data)
    input_irreps = dict(input_irreps or {})

    with eval_mode(model):
        ref = run_model(model, data)
        specs = _build_specs(ref, outputs, irreps, per_atom, num_nodes, num_graphs)
        for s in specs:
            if not torch.isfinite(ref[s.name]).all():
                raise AssertionError(f"assert_equivariant: output {s.name!r} is not finite on the untransformed input")

        report: dict[str, float] = {}
        failures: list[_Failure] = []
        for trial in range(max(1, n_trials)):
            for tr in _draw_transforms(
                gen, num_graphs, batch, do_parity, rotation, translation, permutation, translation_scale
            ):
                new = run_model(model, _apply(data, tr, batch, num_nodes, input_irreps))
                for s in specs:
                    failure = _compare(s, ref[s.name], new.get(s.name), tr, num_nodes, num_graphs, atol_, rtol_)
                    key = f"{tr.name}/{s.name}"
                    report[key] = max(report.get(key, 0.0), failure.max_err)
                    if not failure.ok:
                        failure.trial = trial
                        failures.append(failure)
            if failures:  # one failing trial is enough to diagnose; keep the message short
                break

    if failures:
        raise AssertionError(_failure_message(failures, fdtype, atol_, rtol_, do_parity))
    return report


def _failure_message(failures: list[_Failure], dtype: torch.dtype, atol: float, rtol: float, parity: bool) -> str:
    group = "E(3)" if parity else "SE(3)"
    order: dict[str, list[_Failure]] = {}
    for f in failures:
        order.setdefault(f.transform.name, []).append(f)
    lines = [
        f"assert_equivariant: the model is not {group}/permutation-equivariant "
        f"({str(dtype).replace('torch.', '')}, tolerance {atol:g} + {rtol:g} * max|output|, trial {failures[0].trial})",
        "failed: "
        + "; ".join(
            f"{name} [{', '.join(repr(f.name) for f in fs[:4])}{f', +{len(fs) - 4} more' if len(fs) > 4 else ''}]"
            for name, fs in order.items()
        ),
        "likely cause:",
    ]
    failed = list(order)
    worst_relative = max(f.max_err / max(f.scale, 1e-300) if not f.problem else float("inf") for f in failures)
    if dtype == torch.float64 and worst_relative < 1e-5:
        lines.append(
            f"  precision: every error is tiny (at most {worst_relative:.1e} of the output's size), i.e. round-off "
            "rather than a broken symmetry: most likely constants built in float32 inside a float64 model (e3nn "
            "builds so(3) generators / Wigner matrices in the default dtype; compute them in float64, or build the "
            "model under torch.set_default_dtype(torch.float64))"
        )
    for name in failed:
        if name == "reflection" and "rotation" in failed:
            continue
        if name == "combined" and len(failed) > 1:
            continue
        lines.append(f"  {name}: {_HINTS[name]}")
    lines.append("details (worst outputs first):")
    for name, fs in order.items():
        lines.append(f"  {name}: {fs[0].transform.describe()}")
        fs = sorted(fs, key=lambda f: f.max_err / max(f.tol, 1e-300), reverse=True)
        for f in fs[:3]:
            lines.append(f"    {f.line()}")
        if len(fs) > 3:
            lines.append(f"    ... and {len(fs) - 3} more outputs: {[f.name for f in fs[3:]]}")
    return "\n".join(lines)
