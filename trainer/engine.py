"""The DeepSpeed engine of a run: ZeRO stage, precision, clipping, accumulation.

Every run, single process included, trains through this engine. Models know nothing of DeepSpeed;
this module is the only one that wraps them.
"""

from __future__ import annotations

import os
import sys

import torch

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
# DeepSpeed JIT-builds a shared-memory all-reduce op on first use; keep its build cache (and build
# lock) inside this environment, so one venv's interrupted build can never block another's.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

import deepspeed  # noqa: E402  (reads DS_ACCELERATOR at import)

from chimera.configs.schema import RunConfig  # noqa: E402
from chimera.parallel.sharding import full_state_dict  # noqa: E402
from chimera.parallel.topology import DeepSpeedMPU  # noqa: E402
from chimera.trainer.optim import build_optimizer, build_schedule  # noqa: E402


def deepspeed_config(cfg: RunConfig, accumulation: int) -> dict:
    """``accumulation``: micro-batches per optimizer step on each rank (``chimera.configs.schema.accumulation_steps``).
    The loop owns the accumulation boundary: ``backward()`` only accumulates, ``step()`` reduces and updates."""
    t = cfg.train
    zero = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition every parameter, small ones too
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "managed_gradient_accumulation": False,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, cfg: RunConfig, accumulation: int):
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(model, cfg.train),
        lr_scheduler=build_schedule(cfg.train),
        config=deepspeed_config(cfg, accumulation),
        mpu=DeepSpeedMPU(),
    )
    return engine


def gathered_full_state_dict(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the engine's model, whatever the ZeRO stage and TP size (collective)."""
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return full_state_dict(engine.module, engine.module.dims)
