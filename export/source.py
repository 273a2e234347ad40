"""What every export format reads: one checkpoint's full model state, its run config and tokenizer.

Checkpoints are layout-free (``chimera.trainer.checkpoint``): whatever layout wrote them (TP, PP, EP, CP,
ZeRO shards), ``model/NAME`` holds each parameter's full fp32 weights. So an export never needs the training
processes, nor knows the layout that trained the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from chimera.configs.schema import ModelConfig, RunConfig
from chimera.errors import UserError
from chimera.trainer.checkpoint import (
    CHECKPOINTS,
    read_config,
    read_weights,
    resolve_checkpoint,
    step_dirs,
    step_of,
    step_tag,
    verify,
)


@dataclass(frozen=True)
class ExportSource:
    checkpoint: Path  # the checkpoint directory read
    step: int
    run: RunConfig  # the resolved run config saved with it
    state: dict[str, torch.Tensor]  # every parameter's full fp32 weights, by name

    @property
    def model_cfg(self) -> ModelConfig:
        return self.run.model

    @property
    def tokenizer(self) -> str:
        """The run's tokenizer spec (``bytes``, ``dna`` or a tokenizer.json path): ``chimera.data.tokenizers``."""
        return self.run.data.tokenizer

    def build_model(self) -> torch.nn.Module:
        """The model on one process, fp32, eval mode, with these weights."""
        from chimera.models.causal_lm import meta_model
        from chimera.parallel.sharding import load_full_state_dict

        model = meta_model(self.model_cfg)
        load_full_state_dict(model, self.state)
        return model.eval()


def checkpoint_at(run_dir: str | Path, step: int | None) -> Path:
    """The checkpoint to export: ``step`` of a run directory, or (None) its newest valid one; a checkpoint
    directory itself when ``run_dir`` is one (then ``step`` must be None or its own)."""
    path = Path(run_dir)
    if step is None:
        return resolve_checkpoint(path)
    if step < 0:
        raise UserError(f"--step {step}: must be >= 0")
    ckpt = resolve_checkpoint(path) if (path / "trainer_state.json").is_file() else path / CHECKPOINTS / step_tag(step)
    if ckpt.is_dir() and step_of(ckpt) == step:
        return ckpt
    have = [str(step_of(p)) for p in step_dirs(path)]
    raise UserError(f"{str(path)!r} has no checkpoint of step {step} (steps: {', '.join(have) or 'none'}); "
                    "choose one of those, or leave --step out for the newest valid one")


def load_source(run_dir: str | Path, step: int | None = None) -> ExportSource:
    """Read the checkpoint to export (every file checked against its manifest first)."""
    ckpt = checkpoint_at(run_dir, step)
    state = verify(ckpt)
    return ExportSource(checkpoint=ckpt, step=int(state.get("step", step_of(ckpt))), run=read_config(ckpt),
                        state=read_weights(ckpt))
