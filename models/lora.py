"""Low-rank adapters (LoRA; Hu et al., arXiv 2106.09685) on column-parallel projections.

For projections ``y_j = W_j x`` sharing one input, the adapted outputs are::

    y_j = W_j x + B_j (A x)         # A: [r, in], one per adapter; B_j: [out_j, r]

Zamba2 (arXiv 2411.15242, Sec. 2) gives each use of a shared block its own adapters, so the
block's depth-specific behaviour costs ``r (in + out)`` parameters per use instead of a block.
One ``A`` may feed several outputs (Zamba2's fused gate/up projection: ``B = [B_gate; B_up]``).

TP: ``B_j`` splits its output rows with ``W_j`` (column parallel); ``A`` is replicated and its
gradient, the sum over the rank-local rows of every ``B_j``, is partial per rank (summed over TP).
Both start normal (as transformers initialises Zamba2's): these adapters are pretrained with the
block, not added to a trained one, so there is no reason to start them at exactly zero.
"""

from __future__ import annotations

import torch
from torch import nn

from chimera.parallel.dims import ParallelDims
from chimera.parallel.sharding import declare, normal


class LoRA(nn.Module):
    def __init__(self, in_features: int, out_features: tuple[int, ...], rank: int, *, init_std: float,
                 dims: ParallelDims):
        super().__init__()
        # [r, in]: replicated; gradient partial per TP rank
        self.a = declare(nn.Parameter(torch.empty(rank, in_features)), init=normal(init_std),
                         partial_grad_over_tp=dims.tp > 1)
        # [out_j / tp, r] each: split along dim 0, with W_j's output features
        self.b = nn.ParameterList(declare(nn.Parameter(torch.empty(dims.local(out, "LoRA output"), rank)),
                                          init=normal(init_std), split_dim=0) for out in out_features)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x [..., in]`` (the projections' input, full on every TP rank) -> ``[B_j (A x)]``, rank-local rows."""
        ax = torch.matmul(x, self.a.t())
        return [torch.matmul(ax, b.t()) for b in self.b]
