"""Tensor- and sequence-parallel building blocks; the collectives are megatron-core's, on an explicit group.

Shapes: the residual stream is ``[s, b, d]`` (Megatron's convention); with sequence parallelism
each tensor-parallel rank holds ``[s / tp, b, d]`` of it.

The communication pattern of every mixer and MLP is the same, so it lives here:

* ``enter_tensor_parallel(h, dims, ...)`` at the start of a sublayer: with sequence parallelism,
  all-gather the sequence (backward: reduce-scatter); otherwise identity (backward: all-reduce).
  This is the only place where the input gradient of a sublayer is summed over TP ranks, so the
  projections inside (``ColumnParallel``) do no communication of their own.
* ``leave_tensor_parallel(y, dims, ...)`` at the end (``RowParallel`` calls it): all-reduce, or
  reduce-scatter back to sequence shards.
* Parameters that are replicated on every TP rank but receive only a partial gradient there
  (norm weights under sequence parallelism, a shared key/value head used by rank-local query
  heads) are declared with ``partial_grad_over_tp=True`` and their gradient is all-reduced by a
  hook as it is produced (``register_partial_grad_hooks``).

Every function takes the ``ParallelDims`` it works for and communicates only over its group
(``dims.communicates``); with one rank, or one rank emulated without a group, each is the identity.
The layers are ours, not megatron-core's ``ColumnParallelLinear`` & co.: those read the process
group at construction and call ``tp_group.size()`` in their forward even at TP=1, so a model made of
them cannot be built or run without a process group, and importing them costs ~8 s (which would land
on every config check, now that mixers declare their config beside their layers). megatron-core's
autograd mappings (``megatron.core.tensor_parallel.mappings``) and vocab-parallel cross entropy do
the communication; they are imported when a group first communicates.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from chimera.parallel.dims import ParallelDims
from chimera.parallel.sharding import Init, declare, zeros


def _mappings():
    from megatron.core.tensor_parallel import mappings  # heavy: only once a group communicates

    return mappings


class ColumnParallel(nn.Module):
    """``y = x W^T (+ b)`` with the output features split over TP ranks; no communication.

    Its input must come through ``enter_tensor_parallel`` (which sums the input gradient).
    Weight ``[out / tp, in]`` and bias ``[out / tp]``: split along dim 0.
    """

    def __init__(self, in_features: int, out_features: int, dims: ParallelDims, *, init: Init, bias: bool = False,
                 bias_init: Init = zeros):
        super().__init__()
        out_local = dims.local(out_features, "output features")
        self.weight = declare(nn.Parameter(torch.empty(out_local, in_features)), init=init, split_dim=0)
        self.bias = declare(nn.Parameter(torch.empty(out_local)), init=bias_init, split_dim=0) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallel(nn.Module):
    """``y = sum_ranks x_r W_r^T (+ b)``: input features split over TP ranks, output reduced.

    The reduction is an all-reduce, or a reduce-scatter to sequence shards when ``scatter_sequence``
    (default: ``dims.sequence_parallel``). Weight ``[out, in / tp]``: split along dim 1. The bias is
    added after the reduction: replicated, with a partial gradient under sequence parallelism.
    """

    def __init__(self, in_features: int, out_features: int, dims: ParallelDims, *, init: Init, bias: bool = False,
                 scatter_sequence: bool | None = None):
        super().__init__()
        self.dims = dims
        self.scatter_sequence = dims.sequence_parallel if scatter_sequence is None else scatter_sequence
        in_local = dims.local(in_features, "input features")
        self.weight = declare(nn.Parameter(torch.empty(out_features, in_local)), init=init, split_dim=1)
        self.bias = declare(nn.Parameter(torch.empty(out_features)), init=zeros,
                            partial_grad_over_tp=self.scatter_sequence) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = leave_tensor_parallel(F.linear(x, self.weight), self.dims, self.scatter_sequence)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split over TP ranks; output all-reduced. Weight ``[V / tp, d]``.

    Each rank looks up the ids in its range and gives zeros for the others; the all-reduce fills them in.
    """

    def __init__(self, vocab_size: int, dim: int, dims: ParallelDims, *, init: Init):
        super().__init__()
        self.dims = dims
        local = dims.local(vocab_size, "vocab_size")
        self.first = dims.tp_rank * local
        self.weight = declare(nn.Parameter(torch.empty(local, dim)), init=init, split_dim=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.dims.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.first
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return leave_tensor_parallel(out, self.dims, scatter_sequence=False)


def enter_tensor_parallel(h: torch.Tensor, dims: ParallelDims, sequence_sharded: bool) -> torch.Tensor:
    """Start of a TP region ``[s(/tp), b, d] -> [s, b, d]``; its backward sums the gradient over TP ranks.

    ``sequence_sharded``: ``h`` holds this rank's sequence shard (sequence parallelism; not when decoding)."""
    if not dims.communicates:
        return h
    if sequence_sharded:
        return _mappings().gather_from_sequence_parallel_region(h, True, group=dims.tp_group)
    return _mappings().copy_to_tensor_model_parallel_region(h, group=dims.tp_group)


def leave_tensor_parallel(y: torch.Tensor, dims: ParallelDims, scatter_sequence: bool) -> torch.Tensor:
    """End of a TP region: the sum over ranks of their partial outputs ``[s, b, d]`` (all-reduce), or with
    ``scatter_sequence`` this rank's sequence shard of it ``[s / tp, b, d]`` (reduce-scatter)."""
    if not dims.communicates:
        return y
    if scatter_sequence:
        return _mappings().reduce_scatter_to_sequence_parallel_region(y, group=dims.tp_group)
    return _mappings().reduce_from_tensor_model_parallel_region(y, group=dims.tp_group)


def sum_over_tensor_parallel(t: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """Sum over TP ranks, forward and backward: every rank uses the sum, so each holds part of its gradient."""
    if not dims.communicates:
        return t
    m = _mappings()
    return m.reduce_from_tensor_model_parallel_region(m.copy_to_tensor_model_parallel_region(t, group=dims.tp_group),
                                                      group=dims.tp_group)


def scatter_sequence(x: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """``[s, b, d] -> [s / tp, b, d]`` (this rank's sequence shard); backward all-gathers."""
    if not dims.communicates:
        return x
    return _mappings().scatter_to_sequence_parallel_region(x, group=dims.tp_group)


def gather_vocab(logits_local: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """``[..., V / tp] -> [..., V]`` on every rank."""
    if not dims.communicates:
        return logits_local
    return _mappings().gather_from_tensor_model_parallel_region(logits_local, group=dims.tp_group)


def vocab_parallel_cross_entropy(logits_local: torch.Tensor, targets: torch.Tensor,
                                 dims: ParallelDims, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token cross entropy (fp32) from vocabulary-sharded logits ``[..., V / tp]``.

    ``label_smoothing`` ``e``: torch's definition, the target ``(1 - e) one-hot + e / V``, i.e.
    ``(1 - e) (-log p_target) + e mean_j (-log p_j)`` with ``mean_j (-log p_j) = logsumexp(z) - mean_j z_j``.
    (megatron-core's ``label_smoothing`` spreads ``e`` over the ``V - 1`` other tokens instead: not used.) Under TP
    the logsumexp and the mean of the logits over the whole vocabulary come from all-reduced per-shard sums."""
    if dims.tp == 1:
        return F.cross_entropy(logits_local.float().flatten(0, -2), targets.flatten(), reduction="none",
                               label_smoothing=label_smoothing).view_as(targets)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatron_cross_entropy

    # megatron-core's function reads its tensor-parallel group from parallel_state: make sure it is ours
    if dims.tp_group is not parallel_state.get_tensor_model_parallel_group():
        raise RuntimeError("vocab-parallel cross entropy needs the model's TP group to be parallel_state's")
    if not label_smoothing:
        return megatron_cross_entropy(logits_local.float(), targets)
    z = logits_local.float()
    nll = megatron_cross_entropy(z.clone(), targets)  # it shifts and exponentiates its input in place
    largest = z.detach().amax(-1, keepdim=True)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=dims.tp_group)  # a shift only: no gradient needed
    reduce = _mappings().reduce_from_tensor_model_parallel_region  # sum over ranks; each keeps its shard's gradient
    logsumexp = largest.squeeze(-1) + reduce((z - largest).exp().sum(-1), group=dims.tp_group).log()
    mean_logit = reduce(z.sum(-1), group=dims.tp_group) / (z.shape[-1] * dims.tp)
    return (1.0 - label_smoothing) * nll + label_smoothing * (logsumexp - mean_logit)


def register_partial_grad_hooks(module: nn.Module, dims: ParallelDims) -> int:
    """All-reduce over TP, as they are produced, the gradients of parameters declared partial there."""
    if not dims.communicates:
        return 0

    def allreduce(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=dims.tp_group)
        return grad

    n = 0
    for p in module.parameters():
        if p.is_meta:  # another pipeline stage's
            continue
        if getattr(p, "partial_grad_over_tp", False) and not getattr(p, "_partial_grad_hooked", False):
            p.register_hook(allreduce)
            p._partial_grad_hooked = True
            n += 1
    return n
