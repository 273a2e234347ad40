"""Tensor- and sequence-parallel building blocks, on megatron-core's layers and mappings.

Layout: the residual stream is ``[s, b, d]`` (Megatron's convention); with sequence parallelism
each tensor-parallel rank holds ``[s / tp, b, d]`` of it.

The communication pattern of every mixer and MLP is the same, so it lives here:

* ``enter_tensor_parallel(h)`` at the start of a sublayer: with sequence parallelism, all-gather
  the sequence (backward: reduce-scatter); otherwise identity (backward: all-reduce). This is the
  only place where the input gradient of a sublayer is summed over TP ranks, so the projections
  inside (``ColumnParallel``) do no communication of their own.
* ``RowParallel`` at the end: all-reduce (or reduce-scatter back to sequence shards).
* Parameters that are replicated on every TP rank but receive only a partial gradient there
  (norm weights under sequence parallelism, a shared key/value head used by rank-local query
  heads) are declared with ``partial_grad_over_tp=True`` and their gradient is all-reduced by a
  hook as it is produced (``register_partial_grad_hooks``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as mtp

from chimera.parallel.sharding import declare, zeros


@dataclass(frozen=True)
class TPLayout:
    """How a model is split over its tensor-parallel group."""

    size: int = 1
    rank: int = 0
    sequence_parallel: bool = False

    @classmethod
    def current(cls, sequence_parallel: bool = False) -> TPLayout:
        size = ps.get_tensor_model_parallel_world_size()
        rank = ps.get_tensor_model_parallel_rank()
        return cls(size=size, rank=rank, sequence_parallel=sequence_parallel and size > 1)

    def local(self, n: int, what: str = "size") -> int:
        if n % self.size:
            raise ValueError(f"tensor-parallel size {self.size} does not divide {what}={n}")
        return n // self.size


def _megatron_config(sequence_parallel: bool) -> ModelParallelConfig:
    # Weights are created empty and filled by chimera.parallel.sharding.initialize_parameters, which
    # draws the full tensor and keeps this rank's shard: the same seed gives the same model at any TP.
    return ModelParallelConfig(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
    )


def _no_init(tensor):  # initialisation happens layout-free, see above
    return tensor


class ColumnParallel(mtp.ColumnParallelLinear):
    """``y = x W^T (+ b)`` with the output features split over TP ranks; no communication.

    Its input must come through ``enter_tensor_parallel`` (which sums the input gradient).
    Weight ``[out / tp, in]``: split along dim 0.
    """

    def __init__(self, in_features: int, out_features: int, *, init, bias: bool = False):
        super().__init__(
            in_features,
            out_features,
            config=_megatron_config(sequence_parallel=False),
            init_method=_no_init,
            bias=bias,
            gather_output=False,
            disable_grad_reduce=True,
        )
        declare(self.weight, init=init, split_dim=0)
        if bias:
            declare(self.bias, init=zeros, split_dim=0)

    def forward(self, x, weight=None):
        return super().forward(x, weight=weight)[0]


class RowParallel(mtp.RowParallelLinear):
    """``y = sum_ranks x_r W_r^T (+ b)``: input features split over TP ranks, output reduced.

    Reduction is an all-reduce, or a reduce-scatter to sequence shards under sequence parallelism.
    Weight ``[out, in / tp]``: split along dim 1.
    """

    def __init__(self, in_features: int, out_features: int, *, init, sequence_parallel: bool, bias: bool = False):
        super().__init__(
            in_features,
            out_features,
            config=_megatron_config(sequence_parallel=sequence_parallel),
            init_method=_no_init,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        declare(self.weight, init=init, split_dim=1)
        if bias:  # added after the reduction: replicated; partial under sequence parallelism
            declare(self.bias, init=zeros, partial_grad_over_tp=sequence_parallel)

    def forward(self, x):
        return super().forward(x)[0]


class VocabParallelEmbedding(mtp.VocabParallelEmbedding):
    """Token embedding with the vocabulary split over TP ranks; output all-reduced. Weight ``[V / tp, d]``."""

    def __init__(self, vocab_size: int, dim: int, *, init):
        super().__init__(vocab_size, dim, init_method=_no_init, config=_megatron_config(False))
        declare(self.weight, init=init, split_dim=0)


def vocab_parallel_cross_entropy(logits_local: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy from vocabulary-sharded logits ``[..., V / tp]`` (fp32)."""
    return mtp.vocab_parallel_cross_entropy(logits_local.float(), targets)


def gather_vocab(logits_local: torch.Tensor) -> torch.Tensor:
    """``[..., V / tp] -> [..., V]`` on every rank."""
    return mtp.gather_from_tensor_model_parallel_region(logits_local)


def enter_tensor_parallel(h: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """Start of a TP region ``[s(/tp), b, d] -> [s, b, d]``; its backward sums the gradient over TP ranks."""
    if sequence_parallel:
        return mtp.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True)
    return mtp.copy_to_tensor_model_parallel_region(h)


def scatter_sequence(x: torch.Tensor) -> torch.Tensor:
    """``[s, b, d] -> [s / tp, b, d]`` (this rank's sequence shard); backward all-gathers."""
    return mtp.scatter_to_sequence_parallel_region(x)


def gather_sequence(x: torch.Tensor) -> torch.Tensor:
    """``[s / tp, b, d] -> [s, b, d]``; backward keeps this rank's shard of the gradient."""
    return mtp.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)


def register_partial_grad_hooks(module: torch.nn.Module) -> int:
    """All-reduce over TP, as they are produced, the gradients of parameters declared partial there."""
    if ps.get_tensor_model_parallel_world_size() == 1:
        return 0
    group = ps.get_tensor_model_parallel_group()

    def allreduce(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    n = 0
    for p in module.parameters():
        if getattr(p, "partial_grad_over_tp", False) and not getattr(p, "_partial_grad_hooked", False):
            p.register_hook(allreduce)
            p._partial_grad_hooked = True
            n += 1
    return n
