"""Stopping a run early and cleanly: preemption signals, Ctrl-C, the job's time limit.

``install`` makes the configured signals (``launch.stop_signals``, default USR2 and TERM) and SIGINT set a
process-wide request instead of killing the process; the training loop agrees on it over all ranks at every step
boundary (``Trainer``), so every rank stops after the same step, saves, and the run exits with
``EXIT_STOPPED`` (75). A second SIGINT exits at once (130), without a traceback. ``deadline`` is the job's end
(``CHIMERA_DEADLINE``, seconds since the epoch, set by the Slurm launcher) less ``launch.save_before_end``:
past it, rank 0 asks to stop as a signal would.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from chimera.errors import EXIT_INTERRUPTED

DEADLINE_ENV = "CHIMERA_DEADLINE"


class StopRequest:
    def __init__(self):
        self.reason: str | None = None
        self.interrupts = 0

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason


REQUEST = StopRequest()


def signal_number(name: str) -> signal.Signals:
    return signal.Signals["SIG" + name.upper().removeprefix("SIG")]


def install(names=("USR2", "TERM")) -> None:
    """Handle ``names`` and SIGINT in this process (the main thread) by asking the run to stop."""
    def on_signal(signum, frame):
        REQUEST.set(signal.Signals(signum).name)

    def on_interrupt(signum, frame):
        REQUEST.interrupts += 1
        if REQUEST.interrupts > 1:
            print("chimera: interrupted again: stopping now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        if os.environ.get("RANK", "0") == "0":
            print("\nchimera: interrupted: saving a checkpoint after this step (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
        REQUEST.set("SIGINT")

    for name in names:
        if signal_number(name) != signal.SIGINT:
            signal.signal(signal_number(name), on_signal)
    signal.signal(signal.SIGINT, on_interrupt)


def deadline(save_before_end: float) -> float | None:
    """When to stop (seconds since the epoch), or None without a known end of the job."""
    end = os.environ.get(DEADLINE_ENV)
    return None if not end else float(end) - save_before_end


def past(deadline_s: float | None) -> bool:
    return deadline_s is not None and time.time() >= deadline_s
