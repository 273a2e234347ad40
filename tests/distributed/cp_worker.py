"""Run by tests under 1 or more ranks: for several models, the logits, loss and full gradients of one batch of packed
documents at a context-parallel layout.

usage: cp_worker.py CP TP OUT.pt PRESET[:OVERRIDE,OVERRIDE...] ...

The batch (2 sequences of 32 tokens) packs documents so that one starts exactly at position 16, where a 2-way
split cuts the sequence, in one row, and one spans it in the other; the loss adds the same tokens unpacked.
Saved (rank 0): per preset, the whole sequence's logits, the loss (the mean of the ranks' objectives over the
context-parallel group: the batch's loss) and every parameter's full gradient (averaged over the
context-parallel ranks, as data x context gradient averaging does).
"""

import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from chimera.parallel import topology  # noqa: E402
from chimera.parallel.context import gather_sequence  # noqa: E402
from chimera.parallel.sharding import full_state_dict  # noqa: E402
from helpers import build_model, preset_spec  # noqa: E402

cp, tp, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
topo = topology.initialize(tensor=tp, context=cp)
dims = topo.dims(sequence_parallel=tp > 1)


def packed_batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 300, (2, 32), generator=g)
    lengths = [(5, 11, 9, 7), (8, 10, 7, 7)]  # row 0: a document starts at 16 (and 5, 25); row 1: one spans 16
    seg = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths])
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    return ids, seg, pos


results = {}
for spec in sys.argv[4:]:
    preset, overrides = preset_spec(spec)
    model = build_model(preset, seed=3, overrides=overrides, dims=dims).double()
    ids, seg, pos = packed_batch()
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    labels[0, 3:7] = -100  # positions left out of the loss (fewer counted tokens on one rank)
    model.train()
    logits = model(ids, segment_ids=seg, position_ids=pos)  # this rank's chunk: [b, s / cp, V]
    loss = model(ids, labels=labels, segment_ids=seg, position_ids=pos)
    loss = loss + model(ids, labels=labels)  # and the same tokens as one document each (state crosses the split)
    loss.backward()
    whole_logits = gather_sequence(logits.detach(), dims, dim=1)
    mean_loss = loss.detach().clone()
    for p in model.parameters():  # data x context averaging, here over the context ranks
        if cp > 1:
            dist.all_reduce(p.grad, group=dims.cp_group)
            p.grad /= cp
    if cp > 1:
        dist.all_reduce(mean_loss, group=dims.cp_group)
        mean_loss /= cp
    grads = full_state_dict(model, dims, of=lambda p: p.grad)
    results[spec] = {"logits": whole_logits, "loss": mean_loss, "grads": grads}
if topo.rank == 0:
    torch.save(results, out)
topology.shutdown()
