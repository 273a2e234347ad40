"""Run by tests on N ranks: whole training runs, one after another in this process group, each through
``chimera.trainer.loop.train`` (what every process that `chimera train --nproc N` launches runs).

usage: train_worker.py OUT.pt RUN_ROOT NAME=PRESET[;FIELD=VALUE...] ...

Run NAME trains in a new directory RUN_ROOT/NAME, from configs/runs/tiny.yaml with the preset and the fields (as
`chimera train configs/runs/tiny.yaml --set ...` would). Saved (rank 0): ``{NAME: train()'s result}``.
"""

import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from chimera.parallel import topology  # noqa: E402
from chimera.trainer.loop import train  # noqa: E402
from helpers import run_configs  # noqa: E402

out, root, specs = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
results = {name: train(cfg, root / name) for name, cfg in run_configs(specs, [])}
if torch.distributed.get_rank() == 0:
    torch.save(results, out)
topology.shutdown()
