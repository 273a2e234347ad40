"""Triton kernel for RMSNorm, forward and backward in one pass over the rows each.

Reference: ``chimera.models.norms.RMSNorm`` (in fp32, whatever the input's dtype)::

    r = 1 / sqrt(mean(x^2) + eps),   y = x r s,   s = w (or 1 + w with ``offset``)

The reference makes five elementwise passes forward (cast, square, mean, scale, cast) and autograd more backward;
here one program normalises ``ROWS`` rows, each whole in registers (``BLOCK_D`` the width's next power of two), and
keeps ``r`` per row for the backward::

    xhat = x r,   g = dy s,   dx = r (g - xhat mean(g xhat)),   ds = sum over rows of dy xhat

``ds`` as one partial sum per program (``[programs, d]``), added up in torch: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 16


@triton.jit
def _forward_kernel(x_ptr, w_ptr, y_ptr, r_ptr, R, D, eps, OFFSET: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    in_d = cols < D
    s = tl.load(w_ptr + cols, mask=in_d, other=0.0).to(tl.float32)
    if OFFSET:
        s = s + 1.0
    for i in range(ROWS):
        row = tl.program_id(0) * ROWS + i
        if row < R:
            x = tl.load(x_ptr + row * D + cols, mask=in_d, other=0.0).to(tl.float32)
            r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
            tl.store(y_ptr + row * D + cols, (x * r * s).to(y_ptr.dtype.element_ty), mask=in_d)
            tl.store(r_ptr + row, r)


@triton.jit
def _backward_kernel(dy_ptr, x_ptr, w_ptr, r_ptr, dx_ptr, ds_ptr, R, D, OFFSET: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    in_d = cols < D
    s = tl.load(w_ptr + cols, mask=in_d, other=0.0).to(tl.float32)
    if OFFSET:
        s = s + 1.0
    ds = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(ROWS):
        row = tl.program_id(0) * ROWS + i
        if row < R:
            x = tl.load(x_ptr + row * D + cols, mask=in_d, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * D + cols, mask=in_d, other=0.0).to(tl.float32)
            r = tl.load(r_ptr + row)
            xhat = x * r
            g = dy * s
            dx = r * (g - xhat * (tl.sum(g * xhat, axis=0) / D))
            tl.store(dx_ptr + row * D + cols, dx.to(dx_ptr.dtype.element_ty), mask=in_d)
            ds += dy * xhat
    tl.store(ds_ptr + tl.program_id(0) * D + cols, ds, mask=in_d)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        D = x.shape[-1]
        x2 = x.contiguous().view(-1, D)
        R = x2.shape[0]
        y = torch.empty_like(x2)
        r = torch.empty(R, device=x.device, dtype=torch.float32)
        programs = triton.cdiv(R, ROWS)
        block = triton.next_power_of_2(D)
        if R:
            _forward_kernel[(programs,)](x2, weight, y, r, R, D, eps, OFFSET=offset, ROWS=ROWS, BLOCK_D=block)
        ctx.save_for_backward(x2, weight, r)
        ctx.offset, ctx.shape = offset, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, r = ctx.saved_tensors
        R, D = x2.shape
        dx = torch.empty_like(x2)
        programs = triton.cdiv(R, ROWS)
        partial = torch.zeros(max(programs, 1), D, device=x2.device, dtype=torch.float32)
        if R:
            _backward_kernel[(programs,)](dy.contiguous().view(-1, D), x2, weight, r, dx, partial, R, D,
                                          OFFSET=ctx.offset, ROWS=ROWS, BLOCK_D=triton.next_power_of_2(D))
        return dx.view(ctx.shape), partial.sum(0).to(weight.dtype), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool) -> torch.Tensor:
    """``RMSNorm`` of ``x [..., d]`` with ``weight [d]`` (scale ``1 + w`` with ``offset``), computed in fp32 and
    returned in ``x``'s dtype, forward and backward fused."""
    return _RMSNorm.apply(x, weight, eps, offset)
