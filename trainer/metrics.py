"""Metrics of a run: ``RUN_DIR/metrics.jsonl`` (one JSON object per logged step), wandb, a progress line.

Only rank 0 writes. wandb runs offline by default with its files under the run directory; the run
id is kept in the run directory so a resumed run continues the same wandb run.

Throughput: ``tokens_per_s`` (all ranks), and from it ``tflops``, the model FLOPs per second of one device
(``chimera.models.flops``: training FLOPs per token at the step's sequence length x tokens/s / devices), and
``mfu``, that over the device's peak (``chimera.trainer.device_peak``): ``mfu = flops_per_token x tokens_per_s /
devices / peak``. ``RUN_DIR/mfu_basis.json`` says what that is measured against: the FLOPs per token, the
devices, the peak and where the peak comes from (rewritten at each start: a resumed run may be on other devices).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import torch

from chimera.configs.schema import LoggingConfig
from chimera.errors import UserError

MFU_BASIS = "mfu_basis.json"


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ModelFlopsRate:
    """``tflops`` and ``mfu`` of a step from its tokens/s, for ``devices`` devices like ``device``."""

    def __init__(self, model_cfg, device: torch.device, precision: str, devices: int):
        self.model_cfg, self.device, self.precision, self.devices = model_cfg, device, precision, devices
        self._per_token: dict[int, float | None] = {}
        self._peak = None

    def flops_per_token(self, seq_len: int) -> float | None:
        """Training FLOPs per token at ``seq_len``; None for a model the FLOP model does not count."""
        if seq_len not in self._per_token:
            from chimera.models.flops import model_flops_per_token

            try:
                self._per_token[seq_len] = model_flops_per_token(self.model_cfg, seq_len)
            except UserError as e:  # no mfu / tflops for this run, said once
                print(f"chimera: no mfu or tflops for this model: {e}", file=sys.stderr, flush=True)
                self._per_token[seq_len] = None
        return self._per_token[seq_len]

    @property
    def peak(self):
        if self._peak is None:
            from chimera.trainer.device_peak import peak_flops

            self._peak = peak_flops(self.device, self.precision)
        return self._peak

    def row(self, seq_len: int, tokens_per_s: float) -> dict:
        flops = self.flops_per_token(seq_len)
        if flops is None:
            return {}
        per_device = flops * tokens_per_s / self.devices
        return {"tflops": per_device / 1e12, "mfu": per_device / self.peak.flops_per_s}

    def basis(self, seq_len: int) -> dict:
        """What ``mfu`` is measured against (``RUN_DIR/mfu_basis.json``)."""
        return {"model_flops_per_token": self.flops_per_token(seq_len), "seq_len": seq_len, "devices": self.devices,
                "peak_tflops": self.peak.flops_per_s / 1e12, "peak_source": self.peak.source}

    def write_basis(self, run_dir: Path, seq_len: int) -> None:
        (Path(run_dir) / MFU_BASIS).write_text(json.dumps(self.basis(seq_len), indent=1) + "\n")


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
            if "mfu" in row:
                parts.append(f"{row['tflops']:.3g} TFLOP/s {100 * row['mfu']:.1f}% MFU")
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
