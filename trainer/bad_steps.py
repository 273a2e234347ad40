"""Bad steps: which steps' updates are skipped, and when a run rolls back.

A step is bad when its loss (averaged over all ranks, so every rank judges alike) is NaN or infinite, when its
gradient norm is (``chimera.trainer.engine.UpdateGate``), or, with ``train.spike.factor``, when its loss exceeds
that factor times the median loss of the last ``train.spike.window`` good steps. A bad step's update is skipped
and the step logged; its batch counts as read. After ``train.spike.max_consecutive`` bad steps in a row the run
rolls back to its last checkpoint and skips those steps' batches (``RUN_DIR/skip_steps.json``, so any later resume
skips them too).

The monitor's state (the recent good losses, the bad steps in a row, the counts) is part of every checkpoint,
so a resumed run judges its next steps as the uninterrupted run would.
"""

from __future__ import annotations

import math
from collections import deque

from chimera.configs.schema import SpikeConfig


class BadStepMonitor:
    def __init__(self, cfg: SpikeConfig, state: dict | None = None):
        self.cfg = cfg
        state = state or {}
        self.recent = deque(state.get("recent", []), maxlen=cfg.window)  # losses of the last good steps
        self.in_a_row = int(state.get("in_a_row", 0))
        self.bad_steps = int(state.get("bad_steps", 0))
        self.first_in_a_row: int | None = state.get("first_in_a_row")

    def judge(self, loss: float) -> str | None:
        """Why a step with this loss is bad, or None."""
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if self.cfg.factor is not None and len(self.recent) >= min(self.cfg.window, 3):
            median = sorted(self.recent)[len(self.recent) // 2]
            if loss > self.cfg.factor * median:
                return f"loss spike ({loss:.4g} > {self.cfg.factor:g} x the running median {median:.4g})"
        return None

    def record(self, step: int, loss: float, verdict: str | None) -> bool:
        """Account for a finished step; whether the run must roll back now."""
        if verdict is None:
            self.recent.append(loss)
            self.in_a_row, self.first_in_a_row = 0, None
            return False
        self.bad_steps += 1
        if self.in_a_row == 0:
            self.first_in_a_row = step
        self.in_a_row += 1
        return self.in_a_row >= self.cfg.max_consecutive

    def state(self) -> dict:
        return {"recent": list(self.recent), "in_a_row": self.in_a_row, "bad_steps": self.bad_steps,
                "first_in_a_row": self.first_in_a_row}
