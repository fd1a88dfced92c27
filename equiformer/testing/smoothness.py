"""``assert_smooth_at_cutoff``: energy (and forces) stay continuous as a pair crosses the cutoff."""

from __future__ import annotations

import copy

import torch
from torch_geometric.data import Data

from equiformer.data.contract import CHEMICAL_SYMBOLS
from equiformer.testing._common import Model, cast_data, eval_mode, prepare_model, run_model

__all__ = ["assert_smooth_at_cutoff", "check_smoothness"]

#: default (h in Å, noise floor relative to max(1, |E|)) per dtype
_DEFAULTS = {torch.float64: (1e-5, 1e-12), torch.float32: (1e-2, 1e-5)}


def assert_smooth_at_cutoff(
    model: Model,
    data: Data,
    cutoff: float,
    pair: tuple[int, int] = (0, 1),
    *,
    energy_key: str = "energy",
    forces_key: str | None = "forces",
    h: float | None = None,
    factor: float = 3.0,
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Assert that the energy (and forces) are continuous when atoms ``pair = (i, j)`` cross ``cutoff``.

    Atom j is placed on the line from atom i through its current position at distances
    ``cutoff - 3h, cutoff - h, cutoff + h, cutoff + 3h``. The change across the cutoff
    (``-h -> +h``) must not exceed ``factor`` times the largest change over the neighbouring
    steps of the same length (``-3h -> -h``, ``+h -> +3h``), plus a rounding floor: a
    smooth function changes by about the same amount over equal steps, a jump does not.

    Args:
        model: ``model(data) -> dict`` with ``energy_key`` and (optionally) ``forces_key``.
        data: one structure (``Data``) with at least two atoms; best a molecule.
        cutoff: the model's cutoff radius in Å.
        pair: atoms (i, j); j is moved.
        forces_key: also require the force on atom j to be continuous (None: energy only).
        h: half step in Å; default 1e-5 (float64), 1e-2 (float32).
        dtype: cast a copy of the model and the data first.

    Returns:
        ``{"energy_jump", "energy_step", "forces_jump", "forces_step"}`` (forces_* only with ``forces_key``).
    """
    __tracebackhide__ = True
    model = prepare_model(model, dtype)
    data = cast_data(data, dtype)
    d_h, floor = _DEFAULTS.get(data.pos.dtype, _DEFAULTS[torch.float32])
    h = d_h if h is None else float(h)
    i, j = (int(a) for a in pair)
    n = data.pos.shape[0]
    if not (0 <= i < n and 0 <= j < n and i != j):
        raise ValueError(f"pair {pair} must name two different atoms of a structure of {n} atoms")
    pos = data.pos.detach().to(torch.float64)
    direction = pos[j] - pos[i]
    if float(direction.norm()) < 1e-8:
        raise ValueError(f"atoms {i} and {j} coincide; choose another pair")
    direction = direction / direction.norm()
    distances = [cutoff - 3 * h, cutoff - h, cutoff + h, cutoff + 3 * h]
    others = torch.cat([pos[:j], pos[j + 1 :]])
    closest = float((others - (pos[i] + cutoff * direction)).norm(dim=-1).min()) if n > 1 else float("inf")
    if closest < 0.5:
        raise ValueError(f"moving atom {j} to {cutoff} Å from atom {i} puts it {closest:.2f} Å from another atom")

    energies, forces = [], []
    with eval_mode(model):
        for d in distances:
            moved = copy.copy(data)
            p = pos.clone()
            p[j] = pos[i] + d * direction
            moved.pos = p.to(data.pos.dtype)
            out = run_model(model, moved)
            if energy_key not in out:
                raise ValueError(f"the model returned no {energy_key!r}; it returned {sorted(out)}")
            energies.append(float(out[energy_key].to(torch.float64).sum()))
            if forces_key is not None:
                if forces_key not in out:
                    raise ValueError(f"the model returned no {forces_key!r} (pass forces_key=None to skip forces)")
                forces.append(out[forces_key][j].to(torch.float64))

    who = f"atoms {i} ({_symbol(data, i)}) and {j} ({_symbol(data, j)})"
    cross = f"distance {cutoff:g} - {h:g} -> {cutoff:g} + {h:g} Å"
    e_jump = abs(energies[2] - energies[1])
    e_step = max(abs(energies[1] - energies[0]), abs(energies[3] - energies[2]))
    e_floor = floor * max(1.0, max(abs(e) for e in energies))
    report = {"energy_jump": e_jump, "energy_step": e_step}
    problems = []
    if e_jump > factor * e_step + e_floor:
        problems.append(
            f"{energy_key!r} jumps by {e_jump:.3e} when {who} cross the cutoff ({cross}), while the neighbouring "
            f"steps of {2 * h:g} Å change it by at most {e_step:.3e}: the radial functions are not zero at the "
            f"cutoff (a missing or non-vanishing envelope / cutoff function)"
        )
    if forces_key is not None:
        f_jump = float((forces[2] - forces[1]).norm())
        f_step = max(float((forces[1] - forces[0]).norm()), float((forces[3] - forces[2]).norm()))
        f_floor = floor * max(1.0, max(float(f.norm()) for f in forces))
        report.update({"forces_jump": f_jump, "forces_step": f_step})
        if f_jump > factor * f_step + f_floor:
            problems.append(
                f"{forces_key!r} on atom {j} jumps by {f_jump:.3e} eV/Å when {who} cross the cutoff ({cross}), "
                f"while the neighbouring steps change it by at most {f_step:.3e}: the envelope's derivative is not "
                f"zero at the cutoff (use a C1 envelope such as a cosine or polynomial cutoff)"
            )
    if problems:
        raise AssertionError("assert_smooth_at_cutoff: " + "\n".join(problems))
    return report


def _symbol(data: Data, i: int) -> str:
    z = int(data.z[i]) if getattr(data, "z", None) is not None else 0
    return CHEMICAL_SYMBOLS[z] if 0 < z < len(CHEMICAL_SYMBOLS) else "?"


#: alias (the name used in the design notes)
check_smoothness = assert_smooth_at_cutoff
