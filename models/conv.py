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

from chimera.models.numerics import at_least_fp32
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


# The longest kernel for which ``depthwise_taps`` (k shifted passes) beats torch's depthwise conv on CPU, forward +
# backward, measured on the 2-core machine at [256, 8, 512] and [1024, 2, 256]: 2.0x at 4 taps, 1.4-1.5x at 8, about
# even at 16, 0.5x at 32 (benchmarks/RESULTS.md).
TAPS_MAX_KERNEL = 8


def same_document(segments: torch.Tensor, j: int, s: int) -> torch.Tensor:
    """``[s, b]``: whether tap ``j``'s input ``x_{t+j}`` lies in output ``t``'s document (that of ``x_{t+k-1}``), for
    ``segments [k-1+s, b]``."""
    return segments[j: j + s] == segments[segments.shape[0] - s:]


def tap_inputs(x: torch.Tensor, j: int, s: int, segments: torch.Tensor | None) -> torch.Tensor:
    """``[s, b, c]``: what weight ``j`` multiplies, ``x_{t+j}`` (0 where it lies in another document)."""
    xj = x[j: j + s]
    return xj if segments is None else xj * same_document(segments, j, s).unsqueeze(-1)


def tap_weight_grads(dy: torch.Tensor, x: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
    """The weight gradient ``[c, k]`` of the conv: ``dw[:, j] = sum_{t, b} dy_t x_{t+j}``, one reduction over (time,
    batch) per tap."""
    s = dy.shape[0]
    k = x.shape[0] - s + 1
    return torch.stack([(dy * tap_inputs(x, j, s, segments)).sum((0, 1)) for j in range(k)], dim=1)


class _TapSums(torch.autograd.Function):
    """``y_t = bias + sum_j w[:, j] x_{t+j}`` as ``k`` shifted multiply-adds in the ``[s, b, c]`` layout, accumulated
    in fp32, with the backward written out: ``dx_{t+j} += w[:, j] dy_t`` for each tap, ``tap_weight_grads``, and the
    bias's sum. The same math as ``depthwise_valid`` / ``depthwise_valid_within_segments`` without their layout changes
    (torch's conv wants ``[b, c, s]``) or autograd's per-tap buffers."""

    @staticmethod
    def forward(ctx, x, weight, bias, segments):
        k = weight.shape[1]
        s = x.shape[0] - k + 1
        w = at_least_fp32(weight)
        y = tap_inputs(x, k - 1, s, segments) * w[:, k - 1]  # fp32 (or wider)
        if bias is not None:
            y += bias
        for j in range(k - 1):
            y.addcmul_(tap_inputs(x, j, s, segments), w[:, j])
        ctx.save_for_backward(x, weight, segments)
        ctx.has_bias = bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, segments = ctx.saved_tensors
        s, k = dy.shape[0], weight.shape[1]
        grad_x = x.new_zeros(x.shape, dtype=at_least_fp32(dy).dtype)
        for j in range(k):
            dyj = dy if segments is None else dy * same_document(segments, j, s).unsqueeze(-1)
            grad_x[j: j + s].addcmul_(dyj, weight[:, j])
        grad_w = tap_weight_grads(dy, x, segments).to(weight.dtype)
        grad_b = dy.sum((0, 1)).to(weight.dtype) if ctx.has_bias else None
        return grad_x.to(x.dtype), grad_w, grad_b, None


def depthwise_taps(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   segments: torch.Tensor | None = None) -> torch.Tensor:
    """``depthwise_valid`` (``segments``: ``depthwise_valid_within_segments``) by shifted multiply-adds, the CPU's fast
    path: on the 2-core machine 2-3x faster than torch's depthwise conv at 4 taps, forward + backward
    (``TAPS_MAX_KERNEL``, ``benchmarks/RESULTS.md``)."""
    return _TapSums.apply(x, weight, bias, segments)


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
