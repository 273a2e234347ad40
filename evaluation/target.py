"""What an evaluation reads: a trained model and the run config it was trained with.

Any run directory (its newest valid checkpoint) or checkpoint directory, whatever layout wrote it, and the run
directory ``chimera import-hf`` writes (a weights-only checkpoint), load the same way: the checkpoint's full
weights into one single-process model (``chimera.trainer.checkpoint.load_inference_model``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from chimera.configs.schema import RunConfig


@dataclass
class EvalTarget:
    model: torch.nn.Module  # eval mode, one process
    run: RunConfig  # the run config saved with the checkpoint
    checkpoint: Path
    step: int

    @property
    def vocab_size(self) -> int:
        return self.run.model.vocab_size

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    def describe(self) -> dict:
        return {"checkpoint": str(self.checkpoint), "step": self.step, "model": self.run.model.name,
                "preset": self.run.model.preset, "parameters": self.num_parameters()}


def load_target(path: str | Path) -> EvalTarget:
    """The model and run config of a run directory's newest valid checkpoint (or of one checkpoint directory);
    a path without one is a ``UserError``."""
    from chimera.trainer.checkpoint import STATE, load_inference_model, read_config, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    model = load_inference_model(ckpt)
    state = json.loads((ckpt / STATE).read_text())
    return EvalTarget(model=model, run=read_config(ckpt), checkpoint=ckpt, step=int(state.get("step", 0)))
