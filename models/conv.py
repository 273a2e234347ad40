"""Causal depthwise temporal convolution: ``y_t = sum_{j<k} w_j * x_{t-k+1+j} + bias`` per channel.

Weight ``[channels, k]`` (``w[:, k-1]`` multiplies the current input). TP splits channels (dim 0),
so no communication. Decoding keeps the last ``k-1`` inputs as state.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from chimera.parallel.sharding import declare, zeros


class CausalConv1d(nn.Module):
    def __init__(self, channels_local: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        bound = 1.0 / math.sqrt(kernel)
        self.weight = declare(
            nn.Parameter(torch.empty(channels_local, kernel)),
            init=lambda t, g: t.uniform_(-bound, bound, generator=g),
            split_dim=0,
        )
        self.bias = declare(nn.Parameter(torch.empty(channels_local)), init=zeros, split_dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [s, b, c] -> [s, b, c]
        xc = x.permute(1, 2, 0)  # [b, c, s]
        y = F.conv1d(F.pad(xc, (self.kernel - 1, 0)), self.weight.unsqueeze(1), self.bias, groups=xc.shape[1])
        return y.permute(2, 0, 1)

    def init_state(self, batch: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch, self.weight.shape[0], self.kernel - 1, device=device, dtype=dtype)

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token ``[b, c]`` -> (output ``[b, c]``, new state ``[b, c, k-1]``)."""
        window = torch.cat([state, x.unsqueeze(-1)], dim=-1)  # [b, c, k]
        y = (window * self.weight).sum(-1) + self.bias
        return y, window[..., 1:]
