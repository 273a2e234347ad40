"""Metrics of a run: ``RUN_DIR/metrics.jsonl`` (one JSON object per logged step), wandb, a progress line.

Only rank 0 writes. wandb runs offline by default with its files under the run directory; the run
id is kept in the run directory so a resumed run continues the same wandb run.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

from chimera.configs.schema import LoggingConfig


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, run_config: dict, enabled: bool, total_steps: int):
        self.enabled, self.cfg, self.total_steps = enabled, cfg, total_steps
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tty = sys.stdout.isatty()
        self._wandb = None
        self._started = time.perf_counter()
        self._first_step: int | None = None
        if enabled and cfg.wandb != "disabled":
            self._wandb = self._start_wandb(Path(run_dir), run_config)

    def _start_wandb(self, run_dir: Path, run_config: dict):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        return wandb.init(project=self.cfg.project, dir=str(run_dir), mode=self.cfg.wandb, id=run_id,
                          resume="allow", config=run_config)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if self.cfg.progress:
            self._progress(row)

    def _progress(self, row: dict) -> None:
        step = row["step"]
        if self._first_step is None:
            self._first_step, self._started = step - 1, time.perf_counter()
        elapsed = time.perf_counter() - self._started
        done = step - self._first_step
        eta = elapsed / max(1, done) * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}"]
        if "loss" in row:
            parts += [f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}", f"{row['tokens_per_s']:,.0f} tok/s"]
        if "val_loss" in row:
            parts.append(f"val_loss {row['val_loss']:.4f}")
        parts.append(f"ETA {format_duration(eta)}")
        line = " | ".join(parts)
        if self.tty and "val_loss" not in row:
            print("\r" + line.ljust(100), end="", flush=True)
        else:
            print(("\n" if self.tty else "") + line, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty and self.cfg.progress:
            print()
        if self._wandb is not None:
            self._wandb.finish()
