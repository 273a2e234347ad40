"""Run by tests on 2 ranks: label-smoothed cross entropy with the vocabulary split over TP, for one batch of
logits and for a model's training loss.

usage: label_smoothing_worker.py OUT.pt SMOOTHING PRESET

Saved (rank 0): the per-token losses of full logits ``[s, b, V]`` (drawn from seed 0) split over the ranks, the
full gradient of their mean w.r.t. the logits; the model's whole logits, its smoothed training loss (in train mode)
and its loss in eval mode.
"""

import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from chimera.parallel import topology  # noqa: E402
from chimera.parallel.layers import vocab_parallel_cross_entropy  # noqa: E402
from helpers import build_model  # noqa: E402

out, smoothing, preset = sys.argv[1], float(sys.argv[2]), sys.argv[3]
topo = topology.initialize(tensor=2)
dims = topo.dims()
g = torch.Generator().manual_seed(0)
logits = torch.randn(6, 3, 40, generator=g) * 3  # fp32: the loss is computed in fp32
targets = torch.randint(0, 40, (6, 3), generator=g)
local = logits.chunk(2, dim=-1)[dims.tp_rank].clone().requires_grad_(True)
losses = vocab_parallel_cross_entropy(local, targets, dims, smoothing)
losses.mean().backward()
grads = [torch.empty_like(local.grad) for _ in range(2)]
dist.all_gather(grads, local.grad.contiguous(), group=dims.tp_group)

model = build_model(preset, seed=3, dims=dims)
ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(5))
labels = torch.roll(ids, -1, dims=1)
model.label_smoothing = smoothing
model.train()
with torch.no_grad():
    whole = model(ids)
    train_loss = model(ids, labels=labels)
    model.eval()
    eval_loss = model(ids, labels=labels)
if topo.rank == 0:
    torch.save({"logits": logits, "targets": targets, "losses": losses.detach(), "grad": torch.cat(grads, -1),
                "model_logits": whole, "labels": labels, "train_loss": train_loss, "eval_loss": eval_loss}, out)
topology.shutdown()
