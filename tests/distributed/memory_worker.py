"""Run by tests on N ranks: for several layouts, the per-rank state a real run holds against the plan
``chimera train --dry-run`` prints (``chimera.trainer.plan``).

usage: memory_worker.py OUT.pt NAME=PRESET[;FIELD=VALUE...] ...

After one training step, each rank measures the bytes of parameters and optimizer state it holds
(``TrainingEngine.held_bytes``: from the tensors themselves) and of gradients as the optimizer step sees them; and its
stage's plan. Saved (rank 0): ``{NAME: [per rank: {"measured": {...}, "planned": {...}}]}``.
"""

import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from chimera.parallel import topology  # noqa: E402
from chimera.trainer.loop import Trainer  # noqa: E402
from chimera.trainer.optimizer_state import base_optimizer, stepped_tensors  # noqa: E402
from chimera.trainer.plan import memory_plan  # noqa: E402
from helpers import run_configs  # noqa: E402

BASE = ["train.steps=1", "train.warmup_steps=1", "train.global_batch_size=4", "train.micro_batch_size=2",
        "data.seq_len=32",
        "logging.wandb=disabled"]


def measure(trainer) -> dict:
    """The engine's own account of what it holds (``TrainingEngine.held_bytes``), and the gradients the optimizer
    step sees: the parameters' ``.grad`` (no ZeRO), or ZeRO-2/3's partitions of them."""
    ds = trainer.engine.ds
    optimizer = base_optimizer(ds)
    tensors = stepped_tensors(ds) if ds.zero_optimization_stage() >= 2 else list(
        trainer.engine.named_parameters().values())
    seen = {}

    def step(*args, _step=optimizer.step, **kwargs):
        seen["gradients"] = sum(t.grad.numel() * t.grad.element_size() for t in tensors if t.grad is not None)
        return _step(*args, **kwargs)

    optimizer.step = step
    trainer.train_step()
    return {**trainer.engine.held_bytes(), **seen}


out, specs = sys.argv[1], sys.argv[2:]
results = {}
with tempfile.TemporaryDirectory() as run_dir:
    for name, cfg in run_configs(specs, BASE):
        trainer = Trainer(cfg, run_dir)
        stage = memory_plan(cfg, dist.get_world_size()).stages[trainer.topo.pipeline_rank]
        planned = {"parameters": stage.parameter_bytes, "optimizer": stage.optimizer_bytes,
                   "gradients": stage.gradient_bytes}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, {"measured": measure(trainer), "planned": planned})
        results[name] = everyone
        del trainer
if dist.get_rank() == 0:
    torch.save(results, out)
topology.shutdown()
