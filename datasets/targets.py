"""Metadata of a dataset's regression targets (name, unit, how errors are reported)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TargetInfo:
    """One graph-level target.

    Attributes:
        name: canonical name, e.g. ``"U0"``.
        unit: unit of the stored values, e.g. ``"eV"``.
        report_unit: unit in which errors are usually reported, e.g. ``"meV"``.
        report_scale: factor from ``unit`` to ``report_unit`` (a MAE in ``unit`` times this).
        description: one line of what the quantity is.
        extensive: the quantity grows with the number of atoms (total, zero-point and free
            energies, ...), so a model normalises it per atom (``normalize="auto"`` of
            :class:`~equiformer.tasks.property.PropertyTask`); ``False`` for intensive ones
            (orbital energies, gaps, dipole moments, energies per atom).
        minimum: the smallest physical value (band gaps: 0 eV), or ``None``; a shipped model's
            predictions are clamped to it (:func:`equiformer.hub.denormalize`).
    """

    name: str
    unit: str
    report_unit: str
    report_scale: float
    description: str
    extensive: bool = False
    minimum: float | None = None

    def to_report(self, value: float) -> float:
        """``value`` (in ``unit``) expressed in ``report_unit``."""
        return float(value) * self.report_scale
