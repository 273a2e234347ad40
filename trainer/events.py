"""``RUN_DIR/events.jsonl``: what happened to a run besides its steps, one JSON object per line.

Each event has ``time`` (UTC, ISO 8601), ``event`` and its own fields:

* ``resume`` (``step``, ``checkpoint``, ``changes``, ``superseded_rows``), ``restart`` (``--restart``: ``archived``),
  ``resume_from`` (``step``, ``set_aside``);
* ``checkpoint_skipped`` (``checkpoint``, ``reason``), ``checkpoint_failed`` (``step``, ``error``);
* ``bad_step`` (``step``, ``reason``, ``loss``, ``grad_norm``), ``rollback`` (``to_step``, ``skip_steps``);
* ``stop`` (``step``, ``reason``: a signal's name or the time limit), ``requeue`` (``job``);
* ``failure`` (``attempt``, ``cause``: which rank died and how) and ``relaunch`` (``attempt``), written by the
  launcher that restarts the run.

Written by one process at a time (rank 0, or the launcher between attempts). ``skip_steps.json`` beside it lists
the steps whose batches a rollback decided to skip (read when the run resumes).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

EVENTS = "events.jsonl"
SKIP_FILE = "skip_steps.json"


def record(run_dir: str | Path, event: str, **fields) -> dict:
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, **fields}
    path = Path(run_dir) / EVENTS
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def read(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / EVENTS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return out


def skip_steps(run_dir: str | Path) -> set[int]:
    path = Path(run_dir) / SKIP_FILE
    if not path.is_file():
        return set()
    try:
        return {int(s) for s in json.loads(path.read_text())}
    except (ValueError, TypeError):
        return set()


def add_skip_steps(run_dir: str | Path, steps) -> None:
    path = Path(run_dir) / SKIP_FILE
    merged = sorted(skip_steps(run_dir) | {int(s) for s in steps})
    tmp = path.with_name(f".{SKIP_FILE}.tmp")
    tmp.write_text(json.dumps(merged))
    tmp.replace(path)
