"""Exponential moving average (EMA) of a network's weights.

:class:`EMAWeights` is an ``nn.Module`` that holds a frozen copy of the network, so a
LightningModule that owns one as ``self.ema`` gets the averaged weights into its
``state_dict`` (keys ``ema.module.*``), onto the right device and into checkpoints with no
extra code; the optimizer never sees them. After every optimizer step call
:meth:`EMAWeights.update`::

    ema_p <- d * ema_p + (1 - d) * p,    d = min(decay, (1 + n) / (10 + n))

where ``n`` counts the updates so far (kept as a buffer, so a resumed run continues the same
sequence). The warm-up of ``d`` lets the average follow the fast early changes of short runs
instead of staying near the initial weights. Non-float buffers (counters, index tables) are
copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMAWeights"]


class EMAWeights(nn.Module):
    """Frozen EMA copy of ``model``; call it like the model (``ema(batch)``).

    Args:
        model: the trained network (copied once; later changes reach the copy only via :meth:`update`).
        decay: the long-run decay ``d`` in [0, 1).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` (default) instead of a constant ``decay``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        """The ``d`` the next :meth:`update` will use."""
        n = int(self.num_updates)
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (same architecture as the copy)."""
        d = self.current_decay()
        ema_params = dict(self.module.named_parameters())
        params = dict(model.named_parameters())
        if ema_params.keys() != params.keys():
            raise ValueError("EMAWeights.update: the model's parameters do not match the averaged copy")
        ema_f, src_f = [], []
        for name, e in ema_params.items():
            p = params[name].detach()
            if e.is_floating_point():
                ema_f.append(e)
                src_f.append(p.to(e.dtype))
            else:
                e.copy_(p)
        if ema_f:
            torch._foreach_lerp_(ema_f, src_f, 1.0 - d)
        # Buffers of the same name and shape: float ones averaged, others copied. Caches a model
        # (re)builds lazily in forward may differ in shape between the two copies and are skipped.
        ema_buffers = dict(self.module.named_buffers())
        avg_dst, avg_src, copy_dst, copy_src = [], [], [], []
        for name, b in model.named_buffers():
            e = ema_buffers.get(name)
            if e is None or e.shape != b.shape or e.numel() == 0:
                continue
            if e.is_floating_point():
                avg_dst.append(e)
                avg_src.append(b.detach().to(e.dtype))
            else:
                copy_dst.append(e)
                copy_src.append(b.detach())
        if avg_dst:
            torch._foreach_lerp_(avg_dst, avg_src, 1.0 - d)
        if copy_dst:
            torch._foreach_copy_(copy_dst, copy_src)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s weights with the averaged ones."""
        model.load_state_dict(self.module.state_dict())

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
