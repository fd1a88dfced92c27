"""Training throughput as a Lightning callback (graphs per second after a warm-up)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


class ThroughputTimer(L.Callback):
    """Counts graphs (molecules, crystals) trained per second of wall time.

    The clock starts at the end of step ``skip`` (compilation, allocator and data-loader warm-up
    excluded) and every step after it is timed; on CUDA each step ends with a synchronisation so
    the time is the GPU's, not the launch queue's.
    """

    def __init__(self, skip: int = 5) -> None:
        self.skip = skip
        self.t0: float | None = None
        self.steps = 0
        self.graphs = 0
        self.elapsed = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if trainer.global_step == self.skip:
            self.t0 = time.perf_counter()
        elif self.t0 is not None:
            self.steps += 1
            self.graphs += int(batch.num_graphs)
            self.elapsed = time.perf_counter() - self.t0

    @property
    def graphs_per_s(self) -> float:
        """Graphs per second over the timed steps (NaN before any was timed)."""
        return self.graphs / self.elapsed if self.elapsed > 0 else float("nan")
