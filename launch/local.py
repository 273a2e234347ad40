"""Local multi-process launch: N worker processes on this machine with torchrun-style rendezvous, restarted after a
failure.

Each worker gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` and joins the
process group through ``env://``. The rendezvous store is the launcher's own (torchrun's agent store): it is bound
to a port the system picks before any worker starts, so no other process can take the port between its choice and
its use, and each start gets a fresh store. The workers run in a session of their own, so a Ctrl-C at the terminal
reaches the launcher only, which passes each SIGINT (and each stop signal, e.g. a scheduler's SIGTERM) on to every
worker exactly once; the workers die with the launcher.

If a worker fails (a non-zero exit other than a user error or a clean stop, or killed by a signal such as SIGKILL),
the others are killed at once (their collectives could only wait on the dead one) and, up to ``max_restarts``
times, all of them start again: the run resumes from its last valid checkpoint. Each failure and restart is an
event in ``RUN_DIR/events.jsonl`` with its cause.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

from chimera.errors import EXIT_INTERRUPTED, EXIT_STOPPED, EXIT_USER_ERROR

FINAL = (0, EXIT_USER_ERROR, EXIT_STOPPED, EXIT_INTERRUPTED)  # exit codes a restart would not change


def _die_with_parent() -> None:
    """In the child: its own session, and SIGKILL when the launcher dies (Linux ``PR_SET_PDEATHSIG``)."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def describe_exit(rank: int, code: int) -> str:
    if code < 0:
        return f"rank {rank} was killed by {signal.Signals(-code).name}"
    return f"rank {rank} exited with code {code}"


class _Attempt:
    """One start of all the workers."""

    def __init__(self, nproc: int, command: list[str]):
        from torch.distributed import TCPStore

        self.store = TCPStore("127.0.0.1", 0, nproc, is_master=True, wait_for_workers=False)
        port = self.store.port
        self.procs = []
        for rank in range(nproc):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                       LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       TORCHELASTIC_USE_AGENT_STORE="True",
                       OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))))
            self.procs.append(subprocess.Popen(command, env=env, preexec_fn=_die_with_parent))

    def signal(self, signum: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def wait(self) -> tuple[int, str | None]:
        """(the first non-zero exit code or 0, what failed)."""
        while True:
            codes = [p.poll() for p in self.procs]
            failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                if code not in FINAL:  # a crash: the others would wait on it until their timeout
                    self.signal(signal.SIGKILL)
                for p in self.procs:
                    p.wait()
                return code, describe_exit(rank, code)
            if all(c == 0 for c in codes):
                return 0, None
            time.sleep(0.1)


def launch(nproc: int, command: list[str], max_restarts: int = 0, run_dir: str | None = None,
           forward=("USR2", "TERM")) -> int:
    """Run ``command`` as ``nproc`` ranks, restarting all of them after a failure up to ``max_restarts`` times;
    returns the final exit code."""
    from chimera.trainer import events

    stops = [signal.Signals["SIG" + name.upper().removeprefix("SIG")] for name in forward]
    stops = [s for s in stops if s != signal.SIGINT]
    current: list[_Attempt] = []
    interrupts = [0]

    def pass_on(signum, frame):
        if signum == signal.SIGINT:
            interrupts[0] += 1
        if current:
            current[0].signal(signum)

    previous = {s: signal.signal(s, pass_on) for s in (*stops, signal.SIGINT)}
    try:
        for attempt in range(max_restarts + 1):
            current[:] = [_Attempt(nproc, command)]
            code, cause = current[0].wait()
            if code in FINAL or interrupts[0] or attempt == max_restarts:
                if code not in FINAL and run_dir is not None:
                    events.record(run_dir, "failure", attempt=attempt + 1, cause=cause, restarting=False)
                if code not in FINAL and not interrupts[0]:
                    print(f"chimera: {cause}; no restart left (launch.max_restarts={max_restarts})",
                          file=sys.stderr, flush=True)
                return code
            print(f"chimera: {cause}; restarting from the last valid checkpoint (restart {attempt + 1} of "
                  f"{max_restarts})", file=sys.stderr, flush=True)
            if run_dir is not None:
                events.record(run_dir, "failure", attempt=attempt + 1, cause=cause, restarting=True)
                events.record(run_dir, "relaunch", attempt=attempt + 2)
        return code
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
