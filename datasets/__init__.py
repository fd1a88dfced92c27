"""Datasets yielding the one data contract (see ``equiformer.data.contract``).

Installed as ``equiformer.datasets`` (never a top-level ``datasets`` package).
"""

from equiformer.datasets.cache import CACHE_ENV, default_cache_root
from equiformer.datasets.qm9 import (
    HARTREE_TO_EV,
    QM9,
    QM9_NUM_MOLECULES,
    QM9_SPLIT_SIZES,
    QM9_TARGET_NAMES,
    QM9_TARGETS,
    qm9_atomref,
    qm9_atomrefs,
    qm9_split,
    qm9_target_info,
    resolve_qm9_targets,
)
from equiformer.datasets.splits import DEFAULT_SPLIT_SEED, random_split_indices, scaled_split_sizes
from equiformer.datasets.targets import TargetInfo

__all__ = [
    "CACHE_ENV",
    "DEFAULT_SPLIT_SEED",
    "HARTREE_TO_EV",
    "QM9",
    "QM9_NUM_MOLECULES",
    "QM9_SPLIT_SIZES",
    "QM9_TARGETS",
    "QM9_TARGET_NAMES",
    "TargetInfo",
    "default_cache_root",
    "qm9_atomref",
    "qm9_atomrefs",
    "qm9_split",
    "qm9_target_info",
    "random_split_indices",
    "resolve_qm9_targets",
    "scaled_split_sizes",
]
