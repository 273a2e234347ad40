"""Hang and straggler visibility.

* ``StepWatchdog``: armed at the start of each step; if the step takes longer than ``DUMP_AT`` x
  ``parallel.timeout``, the Python stack of every thread of this rank is written to
  ``RUN_DIR/stacks/rank_XXXXX.txt`` (``faulthandler``, which needs neither the GIL nor a healthy interpreter), so a
  hang shows where each rank waits. Before the timeout itself: at the timeout the collectives give up and the
  ranks exit, and a stack must be on disk by then.
* ``rank_stats``: every rank's step time and peak memory gathered on every rank (collective), summarised as
  min/median/max step time and the slowest rank, and the largest peak memory and its rank.
"""

from __future__ import annotations

import faulthandler
import resource
from pathlib import Path

import torch
import torch.distributed as dist

DUMP_AT = 0.8


class StepWatchdog:
    def __init__(self, run_dir: Path, rank: int, timeout: float):
        self.timeout = DUMP_AT * timeout
        folder = Path(run_dir) / "stacks"
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / f"rank_{rank:05d}.txt", "a")  # noqa: SIM115 (open while the run lives)

    def arm(self) -> None:
        faulthandler.dump_traceback_later(self.timeout, repeat=False, file=self.file)

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()

    def close(self) -> None:
        self.disarm()
        self.file.close()


def peak_memory_gib() -> float:
    """This rank's peak memory: the accelerator's allocated peak, else the process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / (1 << 30)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # kB


def rank_stats(step_seconds: float) -> dict:
    mine = torch.tensor([step_seconds, peak_memory_gib()], dtype=torch.float64)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    if dist.get_backend() == "nccl":
        mine = mine.cuda()
        everyone = [t.cuda() for t in everyone]
    dist.all_gather(everyone, mine)
    times = sorted((float(t[0]), r) for r, t in enumerate(everyone))
    memory = max((float(t[1]), r) for r, t in enumerate(everyone))
    return {"step_s_min": times[0][0], "step_s_median": times[len(times) // 2][0], "step_s_max": times[-1][0],
            "slowest_rank": times[-1][1], "peak_memory_gib": memory[0], "peak_memory_rank": memory[1]}
