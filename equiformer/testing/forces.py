"""``assert_forces_are_gradients``: predicted forces equal minus the numerical gradient of the energy."""

from __future__ import annotations

import copy
import warnings

import torch
from torch_geometric.data import Data

from equiformer.data.contract import CHEMICAL_SYMBOLS
from equiformer.testing._common import (
    Model,
    cast_data,
    eval_mode,
    float_dtype,
    graph_info,
    make_generator,
    prepare_model,
    run_model,
)

__all__ = ["assert_forces_are_gradients"]

#: default (eps in Å, atol in eV/Å, rtol) of the central difference per dtype
DEFAULT_FD: dict[torch.dtype, tuple[float, float, float]] = {
    torch.float64: (1e-4, 1e-6, 1e-5),
    torch.float32: (1e-2, 1e-2, 5e-2),
}


def _total_energy(model: Model, data: Data, energy_key: str) -> float:
    out = run_model(model, data)
    if energy_key not in out:
        raise ValueError(f"the model returned no {energy_key!r}; it returned {sorted(out)}")
    return float(out[energy_key].to(torch.float64).sum())


def assert_forces_are_gradients(
    model: Model,
    data: Data,
    energy_key: str = "energy",
    forces_key: str = "forces",
    *,
    eps: float | None = None,
    n_atoms_checked: int | None = 4,
    atoms: list[int] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Assert ``forces == -dE/dpos`` by central finite differences.

    For each checked atom i and direction c, ``-(E(pos + eps e_ic) - E(pos - eps e_ic)) / (2 eps)``
    (E summed over the graphs of the batch) must equal ``forces[i, c]`` within
    ``atol + rtol * max|forces|``. Truncation error is O(eps^2): use float64 (``dtype=torch.float64``).

    Args:
        model: ``model(data) -> dict`` with ``energy_key`` ([B] or [B, 1], eV) and ``forces_key`` ([N, 3], eV/Å).
        data: a PyG ``Data`` or ``Batch``.
        eps: displacement in Å; default 1e-4 in float64, 1e-2 in float32.
        n_atoms_checked: how many atoms (drawn at random) to displace; None for all.
        atoms: explicit atom indices to check (overrides ``n_atoms_checked``).
        atol, rtol: tolerance; defaults float64 1e-6 eV/Å and 1e-5, float32 1e-2 and 5e-2.
        dtype: cast a copy of the model and the data first (the caller's model is not modified).
        seed, generator: which atoms are drawn.

    Returns:
        ``{"max_error": ..., "max_force": ..., "tolerance": ...}``.

    Raises:
        AssertionError: listing the worst atoms (index, element, component, numerical and predicted
            value) and a diagnosis (sign flipped, constant scale factor, forces detached, ...).
    """
    __tracebackhide__ = True
    model = prepare_model(model, dtype)
    data = cast_data(data, dtype)
    fdtype = float_dtype(data)
    d_eps, d_atol, d_rtol = DEFAULT_FD.get(fdtype, DEFAULT_FD[torch.float32])
    eps = d_eps if eps is None else float(eps)
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    num_nodes, _, _ = graph_info(data)
    gen = make_generator(seed, generator)

    if atoms is not None:
        chosen = [int(a) for a in atoms]
        bad = [a for a in chosen if not 0 <= a < num_nodes]
        if bad:
            raise ValueError(f"atoms {bad} out of range for a structure of {num_nodes} atoms")
    elif n_atoms_checked is None or n_atoms_checked >= num_nodes:
        chosen = list(range(num_nodes))
    else:
        chosen = sorted(torch.randperm(num_nodes, generator=gen)[:n_atoms_checked].tolist())

    with eval_mode(model):
        out = run_model(model, data)
        for key in (energy_key, forces_key):
            if key not in out:
                raise ValueError(f"the model returned no {key!r}; it returned {sorted(out)}")
        forces = out[forces_key].to(torch.float64)
        if forces.shape != (num_nodes, 3):
            raise ValueError(f"output {forces_key!r} has shape {tuple(forces.shape)}, expected ({num_nodes}, 3)")
        numeric = torch.zeros(len(chosen), 3, dtype=torch.float64)
        for row, i in enumerate(chosen):
            for c in range(3):
                energies = []
                for sign in (1.0, -1.0):
                    moved = copy.copy(data)
                    pos = data.pos.detach().clone()
                    pos[i, c] += sign * eps
                    moved.pos = pos
                    energies.append(_total_energy(model, moved, energy_key))
                numeric[row, c] = -(energies[0] - energies[1]) / (2 * eps)

    predicted = forces[chosen]
    err = (predicted - numeric).abs()
    scale = max(float(predicted.abs().max()), float(numeric.abs().max()))
    tol = atol + rtol * scale
    report = {"max_error": float(err.max()), "max_force": scale, "tolerance": tol}
    if scale <= tol:
        warnings.warn(
            f"assert_forces_are_gradients: every checked force is ~0 (max {scale:.1e} eV/Å; a symmetric structure?): "
            "the check cannot tell right forces from wrong ones; displace the atoms a little first",
            stacklevel=2,
        )
    if report["max_error"] > tol:
        raise AssertionError(_message(data, chosen, predicted, numeric, err, tol, eps, energy_key, forces_key, fdtype))
    return report


def _diagnosis(predicted: torch.Tensor, numeric: torch.Tensor, tol: float) -> str:
    p, n = predicted.flatten(), numeric.flatten()
    if float(p.abs().max()) <= tol:
        return "the forces are zero while the energy depends on positions: are they detached from the energy's graph?"
    if float(n.abs().max()) <= tol:
        return "the energy does not change with positions, yet forces are non-zero: do both come from the same model?"
    k = float((p @ n) / (n @ n))
    residual = float((p - k * n).abs().max())
    if residual <= max(tol, 1e-3 * float(p.abs().max())):
        if abs(k + 1) < 1e-3:
            return "forces = +dE/dpos: the sign is flipped (forces must be MINUS the gradient)"
        return (
            f"forces = {k:.6g} x (-dE/dpos): a constant scale factor (a unit mismatch, e.g. Hartree/Bohr vs eV/Å, "
            f"or a normalisation applied to one of energy and forces only)"
        )
    return "forces are not proportional to -dE/dpos: they come from a different function than the energy"


def _message(
    data: Data,
    chosen: list[int],
    predicted: torch.Tensor,
    numeric: torch.Tensor,
    err: torch.Tensor,
    tol: float,
    eps: float,
    energy_key: str,
    forces_key: str,
    dtype: torch.dtype,
) -> str:
    lines = [
        f"assert_forces_are_gradients: {forces_key!r} is not -d{energy_key}/dpos: max error {float(err.max()):.3e} "
        f"eV/Å > tolerance {tol:.3e} ({str(dtype).replace('torch.', '')}, central differences with eps={eps:g} Å, "
        f"{len(chosen)} atoms checked)",
        f"diagnosis: {_diagnosis(predicted, numeric, tol)}",
        "worst entries (atom, element, component: -dE/dpos numerical vs predicted):",
    ]
    z = getattr(data, "z", None)
    order = torch.argsort(err.flatten(), descending=True)[:6]
    for flat in order.tolist():
        row, c = divmod(flat, 3)
        i = chosen[row]
        element = CHEMICAL_SYMBOLS[int(z[i])] if z is not None and 0 < int(z[i]) < len(CHEMICAL_SYMBOLS) else "?"
        lines.append(
            f"  atom {i} ({element}), {'xyz'[c]}: numerical {float(numeric[row, c]):+.6e}, "
            f"predicted {float(predicted[row, c]):+.6e}, error {float(err[row, c]):.2e}"
        )
    return "\n".join(lines)
