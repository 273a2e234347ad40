"""Run by tests on 1 or 2 ranks: one training step of Zamba2 with its first shared block used on both pipeline stages
(pattern ``MM0M|M1MM0M`` at 2 ranks), then a checkpoint.

usage: shared_block_worker.py OUT.pt RUN_DIR

Saved (rank 0): ``{"grads": [per rank: {name: gradient}], "loss": ...}`` with each rank's gradients of the shared
blocks' parameters as the optimizer receives them (after the pipeline stages' copies are summed and the data-parallel
average), and the step's loss. Gradient clipping is off, so those are the raw gradients.
"""

import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from chimera.configs.loader import load_run_config  # noqa: E402
from chimera.parallel import topology  # noqa: E402
from chimera.trainer.loop import Trainer  # noqa: E402
from chimera.trainer.optimizer_state import base_optimizer  # noqa: E402
from helpers import REPO  # noqa: E402

out, run_dir = sys.argv[1], sys.argv[2]
world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
fields = ["model.preset=zamba2-tiny", "train.steps=1", "train.warmup_steps=1", "train.global_batch_size=2",
          "train.micro_batch_size=1",
          "data.seq_len=32", "train.grad_clip=0", "logging.wandb=disabled",
          f"model.pattern={'MM0M|M1MM0M' if world == 2 else 'MM0MM1MM0M'}", f"parallel.pipeline={world}"]
trainer = Trainer(load_run_config(REPO / "configs/runs/tiny.yaml", fields), run_dir)
shared = {name: p for name, p in trainer.engine.named_parameters().items() if name.startswith("shared.")}
captured = {}
optimizer = base_optimizer(trainer.engine.ds)
step = optimizer.step


def capture_then_step(*args, **kwargs):
    captured.update({name: p.grad.detach().clone() for name, p in shared.items()})
    return step(*args, **kwargs)


optimizer.step = capture_then_step
loss, _ = trainer.train_step()
trainer.save()
everyone = [None] * dist.get_world_size()
dist.all_gather_object(everyone, captured)
if dist.get_rank() == 0:
    torch.save({"grads": everyone, "loss": loss}, out)
topology.shutdown()
