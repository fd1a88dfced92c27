"""ASE calculator backed by a shipped model that predicts an energy.

>>> from ase.build import molecule
>>> from equiformer.calculator import EquiformerCalculator
>>> atoms = molecule("H2O")
>>> atoms.calc = EquiformerCalculator("qm9-equiformer-u0")          # doctest: +SKIP
>>> atoms.get_potential_energy(), atoms.get_forces()                 # doctest: +SKIP

For a QM9 model the energy is its U0 prediction (internal energy at 0 K, total with the
atomic reference energies, in eV). Forces are ``-dE/dpos`` by autograd through the network
(the graph is built from positions inside the model, so the model is differentiable);
a model that is not gives ``PropertyNotImplementedError`` for forces. The model's
applicability domain is enforced as in :class:`equiformer.api.Predictor`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

#: Targets taken as "the energy" when none is named, in order of preference.
ENERGY_TARGETS = ("energy", "U0", "u0", "E", "U", "u")

_EV = 1.0


def _unit_scale(unit: str) -> float | None:
    """Factor from ``unit`` to eV, or None when the unit is not an energy."""
    from ase import units

    table = {
        "ev": _EV,
        "mev": 1e-3,
        "hartree": units.Hartree,
        "ha": units.Hartree,
        "kcal/mol": units.kcal / units.mol,
        "kj/mol": units.kJ / units.mol,
        "ry": units.Rydberg,
    }
    return table.get(unit.strip().lower())


class EquiformerCalculator(Calculator):
    """ASE calculator: energy (eV) and forces (eV/Å) from a shipped energy model.

    Args:
        model: a shipped model name, a path to its ``.json``/``.safetensors``, a
            :class:`~equiformer.api.Predictor`, or a ``(network, metadata)`` pair.
        target: the property used as energy; default the first of ``energy``, ``U0``, ``U``
            the model predicts.
        device: ``"cpu"``/``"cuda"``; None picks CUDA when available.
        dtype: float32 (default) or float64 for the network.
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(
        self,
        model: Any = "qm9-equiformer",
        target: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        from equiformer.api import LoadedModel, Predictor, _default_device

        dev = _default_device(device)
        if isinstance(model, Predictor):
            candidates = model.models
        elif isinstance(model, tuple) and len(model) == 2 and isinstance(model[1], Mapping):
            candidates = [LoadedModel(model[0].to(dev).eval(), model[1])]
        elif isinstance(model, (str, os.PathLike)):
            candidates = Predictor.from_pretrained(model, device=dev).models
        else:
            raise TypeError(f"model must be a name, a path, a Predictor or (network, metadata), not {type(model).__name__}")
        self.loaded, self.target_index = self._pick(candidates, target)
        self.loaded.model.to(device=dev, dtype=dtype)
        unit = self.loaded.targets[self.target_index].get("unit", "")
        scale = _unit_scale(unit)
        if scale is None:
            raise ValueError(
                f"target {self.target_name!r} of model {self.loaded.name!r} has unit {unit!r}, not an energy; "
                "the calculator needs an energy target"
            )
        self.scale = scale

    @staticmethod
    def _pick(models: list, target: str | None):
        names = [(lm, i, t["name"]) for lm in models for i, t in enumerate(lm.targets)]
        if target is not None:
            for lm, i, n in names:
                if n == target:
                    return lm, i
            raise ValueError(f"no loaded model predicts {target!r} (they predict {[n for _, _, n in names]})")
        for want in ENERGY_TARGETS:
            for lm, i, n in names:
                if n == want:
                    return lm, i
        raise ValueError(
            f"no loaded model predicts an energy (targets {[n for _, _, n in names]}); "
            f"load a model with one of {list(ENERGY_TARGETS)} or pass target=..."
        )

    @property
    def target_name(self) -> str:
        return self.loaded.targets[self.target_index]["name"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        from torch_geometric.data import Batch

        from equiformer.api import ExtrapolationWarning, OutOfDomainError, _clean
        from equiformer.data import from_ase

        lm = self.loaded
        data = from_ase(self.atoms, properties=False, dtype=torch.float64)  # float64: no rounding of positions
        why = lm.refusal(data)
        if why is not None:
            raise OutOfDomainError(f"{self.atoms.get_chemical_formula()}: {why}")
        note = lm.extrapolation(data)
        if note is not None:
            warnings.warn(f"{self.atoms.get_chemical_formula()}: {note}", ExtrapolationWarning, stacklevel=2)

        want_forces = "forces" in properties
        batch = Batch.from_data_list([_clean(data, lm.dtype)]).to(lm.device)
        if want_forces:
            batch.pos.requires_grad_(True)
        with torch.set_grad_enabled(want_forces):
            energy = lm.forward_values(batch)[0, self.target_index] * self.scale
        e = float(energy.detach())
        self.results["energy"] = e
        self.results["free_energy"] = e
        if want_forces:
            try:
                (grad,) = torch.autograd.grad(energy, batch.pos)
            except RuntimeError as exc:
                raise PropertyNotImplementedError(
                    f"model {lm.name!r} is not differentiable with respect to positions, so it gives no forces ({exc})"
                ) from None
            self.results["forces"] = -grad.detach().to("cpu", torch.float64).numpy().astype(np.float64)
