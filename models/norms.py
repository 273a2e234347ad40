"""RMSNorm (Zhang & Sennrich 2019): ``y = x / sqrt(mean(x^2) + eps) * w``, computed in fp32.

With ``offset`` (Gemma, RecurrentGemma) the scale is ``1 + w`` and ``w`` starts at 0. LayerNorm (Ba et al. 2016):
``y = (x - mean(x)) / sqrt(var(x) + eps) * w + b`` (RWKV). ``build_norm`` picks the one ``model.norm`` names.
RMSNorm goes through ``chimera.models.ops.dispatch``: the reference ``rms_norm`` here, or a Triton kernel that keeps
each row in registers (``model.kernels=triton``).
"""

import torch
import torch.nn.functional as F
from torch import nn

from chimera.models.ops import dispatch
from chimera.parallel.sharding import declare, ones, zeros


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool = False) -> torch.Tensor:
    """The reference: ``x / sqrt(mean(x^2) + eps) * w`` (``1 + w`` with ``offset``) in fp32, cast back to ``x``'s
    dtype; its Triton kernel: ``chimera.models.ops.rmsnorm``."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    scale = 1.0 + weight.float() if offset else weight.float()
    return (y * scale).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, sequence_parallel: bool = False, offset: bool = False,
                 kernels: str = "auto"):
        """``kernels``: ``model.kernels`` (``chimera.models.ops.dispatch``)."""
        super().__init__()
        self.eps, self.offset, self.kernels = eps, offset, kernels
        # Replicated on TP ranks; under sequence parallelism each rank sees only its sequence
        # shard, so the weight's gradient is partial and is summed over TP.
        self.weight = declare(nn.Parameter(torch.empty(dim)), init=zeros if offset else ones,
                              partial_grad_over_tp=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.rms_norm(x, self.weight, self.eps, self.offset, kernels=self.kernels)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        # Replicated on TP ranks; partial gradients under sequence parallelism, as RMSNorm's.
        self.weight = declare(nn.Parameter(torch.empty(dim)), init=ones, partial_grad_over_tp=sequence_parallel)
        self.bias = declare(nn.Parameter(torch.empty(dim)), init=zeros, partial_grad_over_tp=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


def build_norm(numerics, dim: int, eps: float, sequence_parallel: bool = False, kernels: str = "auto") -> nn.Module:
    """The norm ``numerics.norm`` names (``chimera.models.numerics``); ``kernels``: ``model.kernels``."""
    if numerics.norm == "layernorm":
        return LayerNorm(dim, eps, sequence_parallel)
    return RMSNorm(dim, eps, sequence_parallel, offset=numerics.norm_offset, kernels=kernels)
