"""ThroughputTimer: graphs per second after the warm-up steps, used by the leaderboard scripts."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

from equiformer.tasks.throughput import ThroughputTimer


def test_counts_only_steps_after_the_warm_up():
    timer = ThroughputTimer(skip=2)
    assert math.isnan(timer.graphs_per_s)
    for step, graphs in enumerate([100, 100, 7, 5, 3], start=1):  # global_step after each optimiser step
        time.sleep(0.01)
        timer.on_train_batch_end(SimpleNamespace(global_step=step), None, None, SimpleNamespace(num_graphs=graphs), step - 1)
    assert timer.steps == 3 and timer.graphs == 15  # the clock started at the end of step 2
    assert 0.025 < timer.elapsed < 1.0
    assert timer.graphs_per_s == timer.graphs / timer.elapsed


def test_leaderboard_scripts_use_it():
    import importlib

    for mod in ("leaderboards.qm9.equal_budget", "leaderboards.mp.equal_budget"):
        assert isinstance(importlib.import_module(mod).make_timer_callback(skip=3), ThroughputTimer)
