"""Triton kernel for the causal depthwise conv1d (the short conv before every scan).

Reference: ``chimera.models.conv.depthwise_valid`` and, with packed documents, ``depthwise_valid_within_segments``::

    y_t = bias + sum_j w[:, j] x_{t+j} [seg(x_{t+j}) = seg(y_t)]        x [k-1+s, b, c] (its k-1 inputs in front)

One program computes a ``[BLOCK_T, BLOCK_C]`` tile of one sequence with the ``k`` taps unrolled, the accumulator in
registers. Backward: the input gradient is the same kernel on the output gradient (zero-padded by ``k-1`` on both
sides) with the taps reversed, ``dx_u = sum_j w_{k-1-j} dy_{u+j-k+1}``; the weight and bias gradients, ``k`` reductions
over (time, batch), in torch.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from chimera.models import conv

BLOCK_T = 16


@triton.jit
def _conv_kernel(z_ptr, w_ptr, bias_ptr, seg_ptr, y_ptr, S, B, C, OWN: tl.constexpr, K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_SEG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """``y_t = bias + sum_j w[:, j] z_{t+j}`` for ``t < S``; with ``HAS_SEG`` a tap counts only if
    ``seg[t+j] == seg[t+OWN]``."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ts = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    seq = tl.program_id(2)
    in_c = cols < C
    in_t = ts < S
    m = in_t[:, None] & in_c[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=in_c, other=0.0).to(tl.float32)[None, :]
    if HAS_SEG:
        own = tl.load(seg_ptr + (ts + OWN) * B + seq, mask=in_t, other=-1)
    for j in tl.static_range(K):
        z = tl.load(z_ptr + ((ts + j) * B + seq)[:, None] * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_SEG:
            tap = tl.load(seg_ptr + (ts + j) * B + seq, mask=in_t, other=-2)
            z = tl.where((tap == own)[:, None], z, 0.0)
        w = tl.load(w_ptr + cols * K + j, mask=in_c, other=0.0).to(tl.float32)
        acc += z * w[None, :]
    tl.store(y_ptr + (ts * B + seq)[:, None] * C + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=m)


def conv_valid(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, segments: torch.Tensor | None,
               own_offset: int) -> torch.Tensor:
    """The kernel: ``z [S+k-1, b, c]``, ``weight [c, k]`` -> ``[S, b, c]`` (``segments [S+k-1, b]`` or None)."""
    K = weight.shape[1]
    L, B, C = z.shape
    S = L - K + 1
    z, weight = z.contiguous(), weight.contiguous()
    y = torch.empty(S, B, C, dtype=z.dtype, device=z.device)
    if y.numel() == 0:
        return y
    seg = segments.to(torch.int32).contiguous() if segments is not None else y
    block_c = 128 if os.environ.get("TRITON_INTERPRET") == "1" else 32  # the interpreter's cost is per program
    grid = (triton.cdiv(C, block_c), triton.cdiv(S, BLOCK_T), B)
    _conv_kernel[grid](z, weight, bias if bias is not None else weight, seg, y, S, B, C, OWN=own_offset, K=K,
                       HAS_BIAS=bias is not None, HAS_SEG=segments is not None, BLOCK_T=BLOCK_T, BLOCK_C=block_c)
    return y


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, segments):
        K = weight.shape[1]
        ctx.save_for_backward(x, weight, segments)
        ctx.has_bias = bias is not None
        return conv_valid(x, weight, None if bias is None else bias, segments, own_offset=K - 1)

    @staticmethod
    def backward(ctx, dy):
        x, weight, segments = ctx.saved_tensors
        K = weight.shape[1]
        dy = dy.contiguous()
        grad_x = grad_w = grad_b = None
        # dy_{t}, t = v - (k-1), at v in [0, s + 2k - 2); its segment: that of y_t, i.e. segments[v]
        padded_seg = None if segments is None else F.pad(segments, (0, 0, 0, K - 1), value=-1)
        if ctx.needs_input_grad[0]:
            grad_x = conv_valid(F.pad(dy, (0, 0, 0, 0, K - 1, K - 1)), weight.flip(1), None, padded_seg, own_offset=0)
        if ctx.needs_input_grad[1]:
            grad_w = conv.tap_weight_grads(dy, x, segments).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = dy.sum((0, 1))
        return grad_x, grad_w, grad_b, None


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   segments: torch.Tensor | None = None) -> torch.Tensor:
    """``chimera.models.conv.depthwise_valid`` (``segments``: ``depthwise_valid_within_segments``) as a kernel."""
    weight = weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    return _DepthwiseConv.apply(x, weight, bias, segments)
