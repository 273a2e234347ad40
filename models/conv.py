"""Causal depthwise temporal convolution: ``y_t = sum_{j<k} w_j * x_{t-k+1+j} + bias`` per channel.

Weight ``[channels, k]`` (``w[:, k-1]`` multiplies the current input). TP splits channels (dim 0),
so no communication; a conv over channels every rank holds whole (``split=False``) is replicated and
its gradient is partial per rank. Decoding keeps the last ``k-1`` inputs as state.

Context parallelism: a rank's first outputs read the ``k-1`` inputs before its chunk, which it receives
from the rank(s) holding them (``chimera.parallel.context.halo``); before the sequence they are zeros,
exactly the zero padding of the unsplit convolution.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from chimera.parallel.context import halo
from chimera.parallel.dims import SINGLE_PROCESS, ParallelDims
from chimera.parallel.sharding import declare, zeros


def depthwise_valid(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``y_t = sum_j weight[:, j] x_{t+j} + bias`` for ``x [k-1+s, b, c]`` (the ``k-1`` inputs before the sequence in
    front), ``weight [c, k]`` -> ``[s, b, c]``: the causal conv once its padding is in place."""
    xc = x.permute(1, 2, 0)  # [b, c, k - 1 + s]
    return F.conv1d(xc, weight.unsqueeze(1), bias, groups=xc.shape[1]).permute(2, 0, 1)


def depthwise_valid_within_segments(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                    segments: torch.Tensor) -> torch.Tensor:
    """``depthwise_valid`` with packed documents: the definition as a sum over lags ``j``, ``w[:, k-1-j] * x_{t-j}``,
    a tap kept only if ``x_{t-j}`` is in ``x_t``'s document (``segments [k-1+s, b]``: the segment id of each input)."""
    kernel = weight.shape[1]
    lead = kernel - 1
    s = x.shape[0] - lead
    own = segments[lead:]
    y = torch.zeros_like(x[lead:]) if bias is None else bias.expand_as(x[lead:]).clone()
    for j in range(kernel):
        same = segments[lead - j: lead - j + s] == own
        y = y + x[lead - j: lead - j + s] * same.unsqueeze(-1) * weight[:, kernel - 1 - j]
    return y


class CausalConv1d(nn.Module):
    def __init__(self, channels_local: int, kernel: int, *, bias: bool = True, split: bool = True,
                 partial_grad_over_tp: bool = False, dims: ParallelDims = SINGLE_PROCESS, kernels: str = "auto"):
        """``split``: the channels are this rank's shard of the full conv's (dim 0); otherwise every rank
        holds the whole conv, with ``partial_grad_over_tp`` when each rank uses it for part of the output.
        ``dims``: the layout, for the halo of the chunk before this rank's under context parallelism.
        ``kernels``: ``model.kernels`` (``chimera.models.ops.dispatch``)."""
        super().__init__()
        self.kernel, self.dims, self.kernels = kernel, dims, kernels
        bound = 1.0 / math.sqrt(kernel)
        placement = {"split_dim": 0} if split else {"partial_grad_over_tp": partial_grad_over_tp}
        # [channels, k] and [channels]
        self.weight = declare(nn.Parameter(torch.empty(channels_local, kernel)),
                              init=lambda t, g: t.uniform_(-bound, bound, generator=g), **placement)
        self.bias = declare(nn.Parameter(torch.empty(channels_local)), init=zeros, **placement) if bias else None

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:
        """``x [s, b, c] -> [s, b, c]``; with packed documents ``docs`` no tap reaches into another document."""
        from chimera.models.ops import dispatch  # imports this module

        before = halo(x, self.kernel - 1, self.dims)  # [k-1, b, c]: zeros unless a chunk precedes this one
        segments = None if docs is None else torch.cat([docs.preceding_segment_ids(self.kernel - 1), docs.segment_ids])
        return dispatch.causal_conv1d(torch.cat([before, x]), self.weight, self.bias, segments, kernels=self.kernels)

    def init_state(self, batch: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch, self.weight.shape[0], self.kernel - 1, device=device, dtype=dtype)

    def state_after(self, x: torch.Tensor) -> torch.Tensor:
        """The decoding state after the inputs ``x [s, b, c]``: their last ``k-1`` ``[b, c, k-1]``, oldest first (zeros
        before the sequence), as ``init_state`` and ``step`` over ``x`` would leave it."""
        lead = self.kernel - 1
        padded = torch.cat([x.new_zeros(lead, *x.shape[1:]), x])
        return padded[padded.shape[0] - lead:].permute(1, 2, 0).contiguous()

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token ``[b, c]`` -> (output ``[b, c]``, new state ``[b, c, k-1]``)."""
        window = torch.cat([state, x.unsqueeze(-1)], dim=-1)  # [b, c, k]
        y = (window * self.weight).sum(-1)
        return (y if self.bias is None else y + self.bias), window[..., 1:]
