"""Model registry: ``build_model(name, **config)`` builds any model of the package by name.

Each entry maps a name to ``"module:attribute"`` (imported on first use, so importing this
package stays light) plus default keyword arguments. Every model stores its constructor
arguments in ``model.config`` and ``build_model(name, **model.config)`` rebuilds it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from torch import nn

__all__ = ["MODEL_REGISTRY", "build_model", "register_model"]

#: name -> (``"module:attribute"`` or a callable, default keyword arguments)
MODEL_REGISTRY: dict[str, tuple[str | Callable[..., nn.Module], dict[str, Any]]] = {
    "equiformer": ("equiformer.models.equiformer:Equiformer", {}),
    "equiformer_small": ("equiformer.models.equiformer:Equiformer", {"preset": "small"}),
    "equiformer_e3": ("equiformer.models.equiformer:Equiformer", {"preset": "qm9_e3"}),
    "equiformer_v2": ("equiformer.models.equiformer_v2:EquiformerV2", {}),
    "equiformer_v2_small": ("equiformer.models.equiformer_v2:EquiformerV2", {"preset": "small"}),
    "equiformer_v2_31M": ("equiformer.models.equiformer_v2:EquiformerV2", {"preset": "31M"}),
    "equiformer_v2_83M": ("equiformer.models.equiformer_v2:EquiformerV2", {"preset": "83M"}),
    "equiformer_v2_153M": ("equiformer.models.equiformer_v2:EquiformerV2", {"preset": "153M"}),
    # crystals
    "icomformer": ("equiformer.models.comformer:IComFormer", {}),
    "ecomformer": ("equiformer.models.comformer:EComFormer", {}),
    "crystalformer": ("equiformer.models.crystalformer:Crystalformer", {}),
    "crystalformer_7": ("equiformer.models.crystalformer:Crystalformer", {"preset": "7_blocks"}),
    # n-body benchmark (GATr paper): inputs mass/pos/vel, output final positions
    "gatr_nbody": ("equiformer.models.gatr_nbody:GATrNBody", {}),
    "transformer_nbody": ("equiformer.models.baselines:NBodyTransformer", {}),
    "egnn_nbody": ("equiformer.models.baselines:NBodyEGNN", {}),
}


def register_model(name: str, target: str | Callable[..., nn.Module], **defaults: Any) -> None:
    """Register ``name`` -> ``target`` (a class/factory or ``"module:attribute"``) with default kwargs."""
    MODEL_REGISTRY[name] = (target, dict(defaults))


def _resolve(target: str | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if callable(target):
        return target
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name``; ``kwargs`` override the entry's defaults.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODEL_REGISTRY))}")
    target, defaults = MODEL_REGISTRY[name]
    return _resolve(target)(**{**defaults, **kwargs})
