"""Run by tests on N ranks: for several layouts, the per-rank state a real run holds against the plan
``chimera train --dry-run`` prints (``chimera.trainer.plan``).

usage: memory_worker.py OUT.pt NAME=PRESET[,FIELD=VALUE...] ...

After one training step, each rank measures the bytes of
* parameters: its parameter shards (ZeRO-3: its partitions, ``ds_tensor``);
* optimizer: AdamW's state tensors, and the fp32 master tensors the optimizer steps when they are not the model's
  parameters (ZeRO 1-3, bf16);
* gradients, as the optimizer step sees them: without ZeRO-2/3 the parameters' ``.grad``, with them the gradient
  partitions of the tensors the optimizer steps;
and its stage's plan. Saved (rank 0): ``{NAME: [per rank: {"measured": {...}, "planned": {...}}]}``.
"""

import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from chimera.configs.loader import load_run_config  # noqa: E402
from chimera.parallel import topology  # noqa: E402
from chimera.trainer.loop import Trainer  # noqa: E402
from chimera.trainer.optimizer_state import base_optimizer  # noqa: E402
from chimera.trainer.plan import memory_plan  # noqa: E402
from helpers import REPO  # noqa: E402

BASE = ["train.steps=1", "train.global_batch_size=4", "train.micro_batch_size=2", "data.seq_len=32",
        "logging.wandb=disabled"]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure(trainer) -> dict:
    ds = trainer.engine.ds
    params = list(trainer.engine.named_parameters().values())
    optimizer = base_optimizer(ds)
    stepped = getattr(ds.optimizer, "fp32_partitioned_groups_flat", None) or [
        t for g in optimizer.param_groups for t in g["params"]]
    model_ids = {id(p) for p in params}
    seen = {}

    def grads_at_step():
        partitioned = ds.zero_optimization_stage() >= 2
        tensors = stepped if partitioned else params
        seen["gradients"] = sum(nbytes(t.grad) for t in tensors if t.grad is not None)

    step = optimizer.step
    optimizer.step = lambda *a, **k: (grads_at_step(), step(*a, **k))[1]
    trainer.train_step()
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return {
        "parameters": sum(nbytes(getattr(p, "ds_tensor", p)) for p in params),
        "optimizer": sum(nbytes(t) for t in state) + sum(nbytes(t) for t in stepped if id(t) not in model_ids),
        "gradients": seen["gradients"],
    }


out, specs = sys.argv[1], sys.argv[2:]
results = {}
with tempfile.TemporaryDirectory() as run_dir:
    for spec in specs:
        name, _, rest = spec.partition("=")
        preset, *fields = rest.split(",")
        cfg = load_run_config(REPO / "configs/runs/tiny.yaml", [*BASE, f"model.preset={preset}", *fields])
        trainer = Trainer(cfg, run_dir)
        stage = memory_plan(cfg, dist.get_world_size()).stages[trainer.topo.pipeline_rank]
        planned = {"parameters": stage.parameter_bytes, "optimizer": stage.optimizer_bytes,
                   "gradients": stage.gradient_bytes}
        mine = {"measured": measure(trainer), "planned": planned}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        results[name] = everyone
        del trainer
if dist.get_rank() == 0:
    torch.save(results, out)
topology.shutdown()
