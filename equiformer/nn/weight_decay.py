"""Which parameters a model trains without weight decay (the papers' convention)."""

from __future__ import annotations

from torch import nn


def no_weight_decay_names(
    model: nn.Module, norm_types: tuple[type, ...], linear_types: tuple[type, ...] = (nn.Linear,)
) -> set[str]:
    """Full names of the parameters of ``norm_types`` modules (norms, radial bases) and the biases
    of ``linear_types`` modules, for a model's ``no_weight_decay()``."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, norm_types) or (isinstance(module, linear_types) and param_name == "bias"):
                names.add(full)
    return names
