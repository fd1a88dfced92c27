"""Learning-rate schedules stepped once per optimizer step.

:class:`WarmupCosineLR` is the schedule Equiformer trained QM9 with (timm's cosine with a
linear warm-up), written per step so short runs and resumed runs see the same curve: the
learning rate at step ``s`` depends on ``s`` alone, and the whole scheduler state is plain
numbers (its ``state_dict`` round-trips through ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupCosineLR", "warmup_cosine_factor", "weight_decay_groups", "schedule_lengths", "adamw_warmup_cosine"]


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float, warmup_start_factor: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    - ``step < warmup_steps``: linear from ``warmup_start_factor`` to 1;
    - then half a cosine from 1 down to ``min_factor`` at ``total_steps``;
    - after ``total_steps``: ``min_factor``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineLR(LRScheduler):
    """Linear warm-up then cosine decay, one ``step()`` per optimizer step.

    Args:
        optimizer: its param groups' ``lr`` at construction are the peak learning rates.
        warmup_steps: steps of linear warm-up (0 disables).
        total_steps: step at which the cosine reaches ``min_lr`` (warm-up included).
        min_lr: final learning rate (absolute, same for every group whose peak is above it).
        warmup_start_lr: learning rate at step 0 when warming up.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        min_lr: float = 0.0,
        warmup_start_lr: float = 1e-6,
        last_epoch: int = -1,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"WarmupCosineLR: total_steps must be >= 1, got {total_steps}")
        if warmup_steps < 0:
            raise ValueError(f"WarmupCosineLR: warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_lr = float(min_lr)
        self.warmup_start_lr = float(warmup_start_lr)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int) -> list[float]:
        """Learning rate of every param group at optimizer step ``step``."""
        out = []
        for base in self.base_lrs:
            min_f = min(self.min_lr / base, 1.0) if base > 0 else 0.0
            start_f = min(self.warmup_start_lr / base, 1.0) if base > 0 else 0.0
            out.append(base * warmup_cosine_factor(step, self.warmup_steps, self.total_steps, min_f, start_f))
        return out

    def get_lr(self) -> list[float]:  # closed form: no dependence on the previous value
        return self.lr_at(self.last_epoch)

    def _get_closed_form_lr(self) -> list[float]:
        return self.lr_at(self.last_epoch)


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: no decay on biases, 1-D weights (norms) and ``model.no_weight_decay()``."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def schedule_lengths(trainer: Any, max_epochs: float | None, warmup_steps: int | None,
                     warmup_epochs: float) -> tuple[int, int]:
    """(warm-up steps, total steps of the cosine) for a Lightning trainer's run.

    ``max_epochs`` (if given) sets the cosine's length in epochs, else the trainer's whole run
    (its ``max_epochs``/``max_steps``); ``warmup_steps`` wins over ``warmup_epochs``.
    """
    total = int(trainer.estimated_stepping_batches)
    accumulate = max(int(trainer.accumulate_grad_batches), 1)
    batches = trainer.num_training_batches
    if batches is None or not math.isfinite(batches) or batches <= 0:
        steps_per_epoch = total / max(trainer.max_epochs or 1, 1)
    else:
        steps_per_epoch = math.ceil(batches / accumulate)
    if max_epochs is not None:
        total = int(round(max_epochs * steps_per_epoch))
    warmup = int(warmup_steps) if warmup_steps is not None else int(round(warmup_epochs * steps_per_epoch))
    return warmup, max(total, 1)


def adamw_warmup_cosine(module: Any, warmup_start_lr: float | None, min_lr: float | None) -> dict[str, Any]:
    """``configure_optimizers`` result of a LightningModule with ``module.model`` and hparams ``lr``,
    ``betas``, ``weight_decay``, ``max_epochs``, ``warmup_steps``, ``warmup_epochs``: AdamW over
    :func:`weight_decay_groups` and :class:`WarmupCosineLR` laid over :func:`schedule_lengths`,
    stepped once per optimizer step (``None`` learning rates take WarmupCosineLR's defaults)."""
    import torch

    hp = module.hparams
    optimizer = torch.optim.AdamW(weight_decay_groups(module.model, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas), eps=1e-8)
    warmup, total = schedule_lengths(module.trainer, hp.max_epochs, hp.warmup_steps, hp.warmup_epochs)
    scheduler = WarmupCosineLR(optimizer, warmup_steps=warmup, total_steps=total, min_lr=min_lr, warmup_start_lr=warmup_start_lr)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
