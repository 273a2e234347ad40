"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from chimera.configs.schema import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """Decay what the model declared decayable (matrices); never norms, biases or recurrence parameters.

    Parameters declared with an ``lr_scale`` other than 1 (``chimera.parallel.sharding.declare``) get groups of their
    own, after the two plain ones, whose ``lr`` is ``lr_scale x lr`` (the schedule then scales every group's rate
    alike, so the ratio holds at every step)."""
    groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}
    for p in model.parameters():
        if p.requires_grad:
            key = (bool(getattr(p, "weight_decay", p.dim() >= 2)), float(getattr(p, "lr_scale", 1.0)))
            groups.setdefault(key, []).append(p)
    out = []
    for (decays, scale), params in groups.items():
        if scale != 1.0 and not params:
            continue
        name = ("decay" if decays else "no_decay") + ("" if scale == 1.0 else f"_lr_x{scale:g}")
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0, "name": name}
        if scale != 1.0:
            if lr is None:
                raise ValueError("parameters with an lr_scale need the base learning rate (lr=)")
            group.update(lr=lr * scale, lr_scale=scale)
        out.append(group)
    return out


@dataclass(frozen=True)
class ScheduleAnchor:
    """Where a run's schedule was re-laid when it resumed with another ``train.steps``: from update ``step`` on, the
    rate falls from ``lr`` (what it was there) to ``min_lr`` at the new last step, so it never jumps."""

    step: int
    lr: float


def lr_at(step: int, cfg: TrainConfig, anchor: ScheduleAnchor | None = None) -> float:
    """The rate of update ``step`` (0-based): linear warmup to ``lr`` over ``warmup_steps`` (reached at update
    ``warmup_steps - 1``), then a cosine that reaches ``min_lr`` at the last update, ``steps - 1``; with an
    ``anchor``, from its step a cosine from its rate to ``min_lr`` at the last update."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    last = cfg.steps - 1
    start, peak = max(cfg.warmup_steps - 1, 0), cfg.lr  # the cosine starts where warmup ends, at its peak
    if anchor is not None and step >= anchor.step:
        start, peak = anchor.step, anchor.lr
    progress = min(1.0, (step - start) / max(1, last - start))
    return cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """torch's fused AdamW (CPU and CUDA): one in-place pass over each tensor, where the default single-tensor form
    allocates temporaries of its size; under ZeRO the tensors are flat partitions, so those temporaries were a
    sizeable share of a rank's memory (measured in benchmarks/RESULTS.md)."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.lr), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             fused=True)


class Schedule:
    """The run's learning-rate schedule as DeepSpeed steps it (once per update); its anchor is set when a resumed run
    re-lays it (``chimera.trainer.resumption``)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.anchor = cfg, None

    def factor(self, step: int) -> float:
        return lr_at(step, self.cfg, self.anchor) / self.cfg.lr

    def __call__(self, optimizer):  # DeepSpeed calls this with the optimizer it wraps
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.factor)


def build_schedule(cfg: TrainConfig) -> Schedule:
    return Schedule(cfg)
