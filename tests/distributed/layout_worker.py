"""Run by tests on N ranks: 3 training steps of several (model, layout) runs, one after another in this process group,
through the trainer (``Trainer.train_step``: the data plan, the DeepSpeed engine, the optimizer step).

usage: layout_worker.py OUT.pt NAME=PRESET[;FIELD=VALUE...] ...

Every run starts from configs/runs/tiny.yaml with 32-token sequences, 4 sequences per step in micro-batches of 2
(one process accumulates 2 of them, the layouts split them over their data-parallel ranks), then the given fields.
After its steps, a run computes its validation loss. Saved (rank 0): ``{NAME: [loss of step 1, 2, 3, val_loss]}``.
"""

import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from chimera.parallel import topology  # noqa: E402
from chimera.trainer.loop import Trainer  # noqa: E402
from helpers import run_configs  # noqa: E402

BASE = ["train.steps=3", "train.global_batch_size=4", "train.micro_batch_size=2", "data.seq_len=32",
        "train.eval_batches=1", "logging.wandb=disabled"]

out, specs = sys.argv[1], sys.argv[2:]
results = {}
with tempfile.TemporaryDirectory() as run_dir:
    for name, cfg in run_configs(specs, BASE):
        trainer = Trainer(cfg, run_dir)
        results[name] = [trainer.train_step()[0] for _ in range(cfg.train.steps)]
        results[name].append(trainer.validation_losses()["val_loss"])
        del trainer
if torch.distributed.get_rank() == 0:
    torch.save(results, out)
topology.shutdown()
