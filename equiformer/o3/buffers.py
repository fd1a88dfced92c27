"""Constant buffers that stay exact under dtype casts.

A module built under a float32 default and then cast with ``.double()`` normally holds float32-rounded
constants (~1e-8 relative error), which caps a float64 equivariance test far above round-off.
:class:`ExactConstants` keeps a float64 master copy of each constant and re-derives the buffer from it
after every ``.to()`` / ``.double()`` / ``.cuda()``, so the buffer is always the correctly rounded
value in the module's current dtype and device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ExactConstants"]


class ExactConstants(nn.Module):
    """Mixin: ``register_constant(name, value)`` adds a non-persistent buffer with a float64 master."""

    def __init__(self) -> None:
        super().__init__()
        self._constant_masters: dict[str, Tensor] = {}

    def register_constant(self, name: str, value: Tensor) -> None:
        """Register ``value`` (a CPU tensor computed in float64; integer tensors are kept as they are) as buffer ``name``.

        The buffer starts on the CPU in the default dtype, also under a ``torch.device("meta")`` context
        (so a model can be instantiated on the meta device, e.g. to count parameters).
        """
        master = value.detach().to("cpu")
        if master.is_floating_point():
            master = master.to(torch.float64)
            value = master.to(torch.get_default_dtype())
        self._constant_masters[name] = master
        self.register_buffer(name, value.clone(), persistent=False)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "ExactConstants":
        super()._apply(fn, *args, **kwargs)
        for name, master in self._constant_masters.items():
            current = self._buffers.get(name)
            if current is not None and master.is_floating_point():
                self._buffers[name] = master.to(device=current.device, dtype=current.dtype)
        return self
