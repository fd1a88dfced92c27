"""Per-target mean absolute error, reported in each target's report unit.

A target is trained in its dataset unit (eV, D, a0^3, ...) and reported in the unit error
tables use (meV for energies): ``report = value * report_scale``. :class:`PerTargetMAE`
accumulates absolute errors in float64 over an epoch (summed across processes under DDP)
and :func:`mae_key` names the logged value, e.g. ``homo_mae_meV``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["PerTargetMAE", "mae_key", "unit_slug"]


def unit_slug(unit: str) -> str:
    """A unit as a metric-name fragment: ``'meV' -> 'meV'``, ``'a0^3' -> 'a03'``, ``'cal/mol K' -> 'cal_mol_K'``."""
    s = unit.replace("^", "").replace("/", "_").replace(" ", "_")
    s = re.sub(r"[^A-Za-z0-9_.-]", "", s)
    return re.sub(r"_+", "_", s).strip("_") or "unitless"


def mae_key(target: str, report_unit: str) -> str:
    """Logged name of a target's MAE, e.g. ``mae_key('homo', 'meV') == 'homo_mae_meV'``."""
    return f"{target}_mae_{unit_slug(report_unit)}"


class PerTargetMAE(Metric):
    """Mean absolute error per target column over everything seen since the last reset.

    ``update(abs_err)`` takes absolute errors [B, T] (any unit); :meth:`compute` returns [T]
    float64 MAEs multiplied by ``scales`` (e.g. the report scale, or ``std * report_scale``
    when the errors are in normalised units).

    Args:
        num_targets: T.
        scales: [T] factors applied in :meth:`compute` (default ones).
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, num_targets: int, scales: Sequence[float] | None = None) -> None:
        super().__init__()
        self.num_targets = int(num_targets)
        s = torch.ones(num_targets, dtype=torch.float64) if scales is None else torch.as_tensor(scales, dtype=torch.float64)
        if s.shape != (num_targets,):
            raise ValueError(f"PerTargetMAE: expected {num_targets} scales, got shape {tuple(s.shape)}")
        self.scales: Tensor
        self.register_buffer("scales", s.clone(), persistent=False)
        self.add_state("abs_sum", default=torch.zeros(num_targets, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def set_scales(self, scales: Sequence[float] | Tensor) -> None:
        """Replace the [T] factors applied by :meth:`compute`."""
        s = torch.as_tensor(scales, dtype=torch.float64, device=self.abs_sum.device)
        if s.shape != (self.num_targets,):
            raise ValueError(f"PerTargetMAE: expected {self.num_targets} scales, got shape {tuple(s.shape)}")
        self.scales = s.clone()

    def update(self, abs_err: Tensor) -> None:  # type: ignore[override]
        if abs_err.dim() != 2 or abs_err.shape[1] != self.num_targets:
            raise ValueError(f"PerTargetMAE.update: expected absolute errors [B, {self.num_targets}], got {tuple(abs_err.shape)}")
        self.abs_sum += abs_err.detach().to(torch.float64).sum(0)
        self.count += abs_err.shape[0]

    def compute(self) -> Tensor:
        return self.abs_sum / self.count.clamp(min=1) * self.scales.to(self.abs_sum.device)
