"""Triton kernel for the epilogue of Hyena's long convolution: the skip and the gate, fused.

Reference: ``chimera.models.mixers.hyena.gate_with_skip``, the step ``z^{n+1} = x^{n+1} * (h^n (*) z^n + D^n z^n)``
after the convolution ``y = h^n (*) z^n``::

    out = g * (y + D z)                 g, y, z [s, b, c],  D [c]

The convolution itself stays an FFT (cuFFT through ``torch.fft``: Triton has no FFT); what this kernel saves is the
three elementwise passes around it and their two intermediates, each of ``[s, b, c]``, forward and backward. One
program computes a ``[BLOCK_R, BLOCK_C]`` tile of the ``(s b) x c`` rows. Backward, in one kernel::

    dg = dout (y + D z),   dy = dout g,   dz = dout g D,   dD = sum over rows of dout g z

the last as one partial sum per row block (``[row blocks, c]``), added up in torch: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R, BLOCK_C = 32, 64


@triton.jit
def _forward_kernel(g_ptr, y_ptr, z_ptr, d_ptr, out_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (rows < R)[:, None] & (cols < C)[None, :]
    at = rows[:, None] * C + cols[None, :]
    D = tl.load(d_ptr + cols, mask=cols < C, other=0.0)[None, :]
    g = tl.load(g_ptr + at, mask=m, other=0.0)
    y = tl.load(y_ptr + at, mask=m, other=0.0)
    z = tl.load(z_ptr + at, mask=m, other=0.0)
    tl.store(out_ptr + at, (g * (y + D * z)), mask=m)


@triton.jit
def _backward_kernel(dout_ptr, g_ptr, y_ptr, z_ptr, d_ptr, dg_ptr, dy_ptr, dz_ptr, dd_ptr, R, C,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    block = tl.program_id(0)
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = cols < C
    m = (rows < R)[:, None] & in_c[None, :]
    at = rows[:, None] * C + cols[None, :]
    D = tl.load(d_ptr + cols, mask=in_c, other=0.0)[None, :]
    dout = tl.load(dout_ptr + at, mask=m, other=0.0)
    g = tl.load(g_ptr + at, mask=m, other=0.0)
    y = tl.load(y_ptr + at, mask=m, other=0.0)
    z = tl.load(z_ptr + at, mask=m, other=0.0)
    gated = dout * g  # d out / d (y + D z)
    tl.store(dg_ptr + at, (dout * (y + D * z)), mask=m)
    tl.store(dy_ptr + at, gated, mask=m)
    tl.store(dz_ptr + at, (gated * D), mask=m)
    tl.store(dd_ptr + block * C + cols, tl.sum(gated * z, axis=0), mask=in_c)  # masked rows load 0


def _grid(R: int, C: int) -> tuple[int, int]:
    return triton.cdiv(R, BLOCK_R), triton.cdiv(C, BLOCK_C)


class _GateWithSkip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, y, z, D):
        ctx.d_dtype = D.dtype
        g, y, z, D = (t.contiguous() for t in (g, y, z, D.to(g.dtype)))
        C = D.shape[0]
        R = g.numel() // C
        out = torch.empty_like(g)
        _forward_kernel[_grid(R, C)](g, y, z, D, out, R, C, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
        ctx.save_for_backward(g, y, z, D)
        return out

    @staticmethod
    def backward(ctx, dout):
        g, y, z, D = ctx.saved_tensors
        C = D.shape[0]
        R = g.numel() // C
        dg, dy, dz = torch.empty_like(g), torch.empty_like(y), torch.empty_like(z)
        partial = torch.empty(_grid(R, C)[0], C, device=g.device, dtype=g.dtype)
        _backward_kernel[_grid(R, C)](dout.contiguous(), g, y, z, D, dg, dy, dz, partial, R, C, BLOCK_R=BLOCK_R,
                                      BLOCK_C=BLOCK_C)
        return dg, dy, dz, partial.sum(0).to(ctx.d_dtype)


def gate_with_skip(g: torch.Tensor, y: torch.Tensor, z: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """``g * (y + D z)`` (``g, y, z [..., c]`` of one shape and dtype, fp32 or wider as Hyena computes its
    streams, ``D [c]`` of that dtype), forward and backward fused."""
    return _GateWithSkip.apply(g, y, z, D)
