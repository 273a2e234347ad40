"""Causal depthwise temporal convolution: ``y_t = sum_{j<k} w_j * x_{t-k+1+j} + bias`` per channel.

Weight ``[channels, k]`` (``w[:, k-1]`` multiplies the current input). TP splits channels (dim 0),
so no communication; a conv over channels every rank holds whole (``split=False``) is replicated and
its gradient is partial per rank. Decoding keeps the last ``k-1`` inputs as state.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from chimera.parallel.sharding import declare, zeros


class CausalConv1d(nn.Module):
    def __init__(self, channels_local: int, kernel: int, *, bias: bool = True, split: bool = True,
                 partial_grad_over_tp: bool = False):
        """``split``: the channels are this rank's shard of the full conv's (dim 0); otherwise every rank
        holds the whole conv, with ``partial_grad_over_tp`` when each rank uses it for part of the output."""
        super().__init__()
        self.kernel = kernel
        bound = 1.0 / math.sqrt(kernel)
        placement = {"split_dim": 0} if split else {"partial_grad_over_tp": partial_grad_over_tp}
        # [channels, k] and [channels]
        self.weight = declare(nn.Parameter(torch.empty(channels_local, kernel)),
                              init=lambda t, g: t.uniform_(-bound, bound, generator=g), **placement)
        self.bias = declare(nn.Parameter(torch.empty(channels_local)), init=zeros, **placement) if bias else None

    def forward(self, x: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``x [s, b, c] -> [s, b, c]``; with ``segment_ids [s, b]`` no tap reaches into another document."""
        if segment_ids is not None:
            return self._forward_within_segments(x, segment_ids)
        xc = x.permute(1, 2, 0)  # [b, c, s]
        y = F.conv1d(F.pad(xc, (self.kernel - 1, 0)), self.weight.unsqueeze(1), self.bias, groups=xc.shape[1])
        return y.permute(2, 0, 1)

    def _forward_within_segments(self, x: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        """The definition as a sum over lags ``j``: ``w[:, k-1-j] * x_{t-j}``, kept only if same document."""
        y = torch.zeros_like(x) if self.bias is None else self.bias.expand_as(x).clone()
        for j in range(self.kernel):
            shifted = F.pad(x, (0, 0, 0, 0, j, 0))[: x.shape[0]]
            same = F.pad(segment_ids, (0, 0, j, 0), value=-1)[: x.shape[0]] == segment_ids
            y = y + shifted * same.unsqueeze(-1) * self.weight[:, self.kernel - 1 - j]
        return y

    def init_state(self, batch: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch, self.weight.shape[0], self.kernel - 1, device=device, dtype=dtype)

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token ``[b, c]`` -> (output ``[b, c]``, new state ``[b, c, k-1]``)."""
        window = torch.cat([state, x.unsqueeze(-1)], dim=-1)  # [b, c, k]
        y = (window * self.weight).sum(-1)
        return (y if self.bias is None else y + self.bias), window[..., 1:]
