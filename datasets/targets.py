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
    """

    name: str
    unit: str
    report_unit: str
    report_scale: float
    description: str

    def to_report(self, value: float) -> float:
        """``value`` (in ``unit``) expressed in ``report_unit``."""
        return float(value) * self.report_scale
