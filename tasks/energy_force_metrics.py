"""Energy and force metrics of OC20 / MD17-style models, accumulated over an epoch.

Definitions (fairchem's S2EF evaluation; units eV, Å):

- energy MAE: mean over structures of ``|E_pred - E|`` (reported in meV), and per atom:
  mean over structures of ``|E_pred - E| / N`` (meV/atom, N = all atoms of the structure);
- force MAE: mean over the evaluated atoms and the 3 components of ``|F_pred - F|`` (meV/Å);
- force L2 MAE: mean over the evaluated atoms of ``||F_pred - F||`` (meV/Å);
- force cosine: mean over the evaluated atoms of ``cos(F_pred, F)``;
- EFwT (energy and forces within threshold): fraction of structures with
  ``|E_pred - E| < 0.02 eV`` **and** ``max_{atoms, components} |F_pred - F| < 0.03 eV/Å``
  (over the evaluated atoms; a structure without evaluated atoms needs the energy only).

"Evaluated atoms" are those of ``mask`` (free atoms in OC20: ``fixed`` ones excluded).
All sums are float64 and reduce by summation across processes (DDP).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["EnergyForceMetrics", "EFWT_ENERGY_THRESHOLD", "EFWT_FORCE_THRESHOLD", "per_structure_max"]

#: EFwT thresholds of OC20: 0.02 eV on the energy, 0.03 eV/Å on every force component
EFWT_ENERGY_THRESHOLD = 0.02
EFWT_FORCE_THRESHOLD = 0.03


def per_structure_max(values: Tensor, index: Tensor, num_structures: int) -> Tensor:
    """[B] maximum of ``values`` [A] per structure (``index`` [A]); 0 where a structure has none.

    ``values`` must be >= 0 (absolute errors).
    """
    out = torch.zeros(num_structures, dtype=values.dtype, device=values.device)
    if values.numel():
        out = out.scatter_reduce(0, index, values, reduce="amax", include_self=True)
    return out


class EnergyForceMetrics(Metric):
    """Accumulates the metrics of the module docstring; :meth:`compute` returns a dict.

    Keys of :meth:`compute`: ``energy_mae_meV``, ``energy_mae_meV_per_atom``,
    ``force_mae_meV_per_A``, ``force_l2mae_meV_per_A``, ``force_cos``, ``efwt``,
    ``num_structures``, ``num_atoms`` (evaluated atoms).

    Args:
        energy_threshold: EFwT energy threshold, eV.
        force_threshold: EFwT force threshold, eV/Å.
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, energy_threshold: float = EFWT_ENERGY_THRESHOLD, force_threshold: float = EFWT_FORCE_THRESHOLD) -> None:
        super().__init__()
        self.energy_threshold = float(energy_threshold)
        self.force_threshold = float(force_threshold)
        f64 = torch.float64
        for name in ("e_abs", "e_abs_per_atom", "f_abs", "f_l2", "f_cos", "efwt_hits"):
            self.add_state(name, default=torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        for name in ("n_struct", "n_atoms"):
            self.add_state(name, default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(  # type: ignore[override]
        self,
        energy_pred: Tensor,
        energy: Tensor,
        natoms: Tensor,
        forces_pred: Tensor | None = None,
        forces: Tensor | None = None,
        atom_index: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> None:
        """Add one batch.

        Args:
            energy_pred, energy: [B] eV.
            natoms: [B] atoms per structure (all atoms: the per-atom energy divides by it).
            forces_pred, forces: [N, 3] eV/Å (None: energy-only metrics).
            atom_index: [N] structure of each atom (0..B-1).
            mask: [N] bool, atoms to evaluate (None: all).
        """
        f64 = torch.float64
        de = (energy_pred.detach().to(f64).reshape(-1) - energy.detach().to(f64).reshape(-1)).abs()
        B = de.numel()
        self.e_abs += de.sum()
        self.e_abs_per_atom += (de / natoms.to(f64).reshape(-1)).sum()
        self.n_struct += B
        ok = de < self.energy_threshold
        if forces_pred is not None and forces is not None:
            if atom_index is None:
                raise ValueError("EnergyForceMetrics.update: atom_index is needed with forces")
            fp, ft = forces_pred.detach().to(f64), forces.detach().to(f64)
            idx = atom_index
            if mask is not None:
                fp, ft, idx = fp[mask], ft[mask], idx[mask]
            diff = (fp - ft).abs()
            self.f_abs += diff.sum()
            self.f_l2 += (fp - ft).norm(dim=-1).sum()
            self.f_cos += torch.nn.functional.cosine_similarity(fp, ft, dim=-1, eps=1e-12).sum()
            self.n_atoms += fp.shape[0]
            max_err = per_structure_max(diff.amax(dim=-1) if diff.numel() else diff.new_zeros(0), idx, B)
            ok = ok & (max_err < self.force_threshold)
        self.efwt_hits += ok.to(f64).sum()

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        ns = self.n_struct.clamp(min=1).to(torch.float64)
        na = self.n_atoms.clamp(min=1).to(torch.float64)
        return {
            "energy_mae_meV": 1000.0 * self.e_abs / ns,
            "energy_mae_meV_per_atom": 1000.0 * self.e_abs_per_atom / ns,
            "force_mae_meV_per_A": 1000.0 * self.f_abs / (3.0 * na),
            "force_l2mae_meV_per_A": 1000.0 * self.f_l2 / na,
            "force_cos": self.f_cos / na,
            "efwt": self.efwt_hits / ns,
            "num_structures": self.n_struct.clone(),
            "num_atoms": self.n_atoms.clone(),
        }
