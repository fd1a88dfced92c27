"""equiformer: SE(3)/E(3)-equivariant transformers for chemistry, materials and 3D geometry."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "Predictor"]


def __getattr__(name: str):  # lazy: `import equiformer` must not import torch-heavy modules
    if name == "Predictor":
        from equiformer.api import Predictor

        return Predictor
    raise AttributeError(f"module 'equiformer' has no attribute {name!r}")
