"""RMSNorm (Zhang & Sennrich 2019): ``y = x / sqrt(mean(x^2) + eps) * w``, computed in fp32."""

import torch
from torch import nn

from chimera.parallel.sharding import declare, ones


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        # Replicated on TP ranks; under sequence parallelism each rank sees only its sequence
        # shard, so the weight's gradient is partial and is summed over TP.
        self.weight = declare(nn.Parameter(torch.empty(dim)), init=ones, partial_grad_over_tp=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)
