"""Run by tests under 1 or 2 ranks: logits, loss and full gradients of one model at a TP layout.

usage: tp_worker.py PRESET TP SEQUENCE_PARALLEL OUT.pt
"""

import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from chimera.parallel import topology  # noqa: E402
from chimera.parallel.sharding import full_state_dict  # noqa: E402
from helpers import build_model  # noqa: E402

preset, tp, sp, out = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
topo = topology.initialize(tensor=tp)
torch.manual_seed(0)
model = build_model(preset, seed=3, dims=topo.dims(sequence_parallel=sp))
ids = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(5))
logits = model(ids)
loss = model(ids, labels=torch.roll(ids, -1, dims=1))
loss.backward()
grads = full_state_dict(model, model.dims, of=lambda p: p.grad)
if topo.rank == 0:
    torch.save({"logits": logits.detach(), "loss": loss.detach(), "grads": grads}, out)
topology.shutdown()
