"""Triton kernels for the diagonal linear recurrence ``h_t = a_t h_{t-1} + b_t`` (time along dim 0).

Reference: ``chimera.models.scan.linear_scan`` (real) and ``scan.HillisSteele`` (complex, as S5 runs it); the
tests hold these kernels to them (``tests/unit/test_kernels.py``).

Each program owns ``BLOCK_C`` channels (the flattened dims after time) and walks the sequence in chunks of
``CHUNK`` steps, carrying the state in registers: a chunk's ``(a, b)`` tile is scanned with the associative
operator ``(a_1, b_1) . (a_2, b_2) = (a_1 a_2, a_2 b_1 + b_2)`` and the carried state enters it as
``h = A_cum h_carry + B_cum``. One read of ``a`` and ``b`` and one write of ``h``: O(T) work, memory bound.

Backward (``_LinearScan.backward``), the adjoint recurrence run from the end, the same kernel on reversed time::

    lambda_t = g_t + a_{t+1} lambda_{t+1}      dL/db_t = lambda_t,  dL/da_t = lambda_t h_{t-1},  dL/dh0 = a_0 lambda_0

(conjugated ``a`` and ``h`` for complex inputs, PyTorch's convention). Document resets need nothing here: the
mixers set ``a_t = 0`` at a document's first token, which drops ``h_{t-1}`` (and stops ``lambda`` crossing back).
Complex recurrences (S5) run as pairs of real tensors.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from chimera.models.scan import _sum_to

CHUNK = 16  # time steps per tile


def block_c() -> int:
    """Channels per program: 64 on a GPU; 256 in the interpreter, whose cost is per program (numpy inside one)."""
    return 256 if os.environ.get("TRITON_INTERPRET") == "1" else 64


@triton.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _combine_complex(ar1, ai1, br1, bi1, ar2, ai2, br2, bi2):
    # (a1 a2, a2 b1 + b2) in complex arithmetic
    return (ar1 * ar2 - ai1 * ai2, ar1 * ai2 + ai1 * ar2,
            ar2 * br1 - ai2 * bi1 + br2, ar2 * bi1 + ai2 * br1 + bi2)


@triton.jit
def _tile(t_ptr, rows, cols, T, C, mask):
    return tl.load(t_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _last_row(x, i, last):
    return tl.sum(tl.where((i == last)[:, None], x, 0.0), axis=0)


@triton.jit
def _steps(start, T, REVERSE: tl.constexpr, CHUNK: tl.constexpr):
    """A tile's steps in scan order ``i``, the time index ``t`` of its ``b`` (and ``h``), and ``t_a`` of its ``a``:
    the same step forward; from the end and one step later in reverse (the adjoint)."""
    i = start + tl.arange(0, CHUNK)
    if REVERSE:
        t = T - 1 - i
        return i, t, t + 1
    return i, i, i


@triton.jit
def _scan_kernel(a_ptr, b_ptr, h0_ptr, h_ptr, T, C, HAS_H0: tl.constexpr, REVERSE: tl.constexpr,
                 CHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
    """``h_t = a_t h_{t-1} + b_t`` over ``[T, C]`` tensors; with ``REVERSE``, ``h_t = a_{t+1} h_{t+1} + b_t`` from the
    end (``a`` then shifted by one step: the adjoint)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = cols < C
    h = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + cols, mask=in_c, other=0.0).to(tl.float32)
    for start in range(0, T, CHUNK):
        i, t, t_a = _steps(start, T, REVERSE, CHUNK)
        m = (i < T)[:, None] & in_c[None, :]
        a = _tile(a_ptr, t_a, cols, T, C, m & (t_a < T)[:, None])
        b = _tile(b_ptr, t, cols, T, C, m)
        a_cum, b_cum = tl.associative_scan((a, b), 0, _combine)
        hs = a_cum * h[None, :] + b_cum
        tl.store(h_ptr + t[:, None] * C + cols[None, :], hs.to(h_ptr.dtype.element_ty), mask=m)
        h = _last_row(hs, i, start + CHUNK - 1)


@triton.jit
def _complex_scan_kernel(ar_ptr, ai_ptr, br_ptr, bi_ptr, h0r_ptr, h0i_ptr, hr_ptr, hi_ptr, T, C,
                         HAS_H0: tl.constexpr, REVERSE: tl.constexpr, CONJ_A: tl.constexpr,
                         CHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
    """``_scan_kernel`` in complex arithmetic on (real, imaginary) pairs; ``CONJ_A`` uses ``conj(a)``."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = cols < C
    hr = tl.zeros([BLOCK_C], dtype=tl.float32)
    hi = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_H0:
        hr = tl.load(h0r_ptr + cols, mask=in_c, other=0.0).to(tl.float32)
        hi = tl.load(h0i_ptr + cols, mask=in_c, other=0.0).to(tl.float32)
    for start in range(0, T, CHUNK):
        i, t, t_a = _steps(start, T, REVERSE, CHUNK)
        m = (i < T)[:, None] & in_c[None, :]
        ma = m & (t_a < T)[:, None]
        ar = _tile(ar_ptr, t_a, cols, T, C, ma)
        ai = _tile(ai_ptr, t_a, cols, T, C, ma)
        if CONJ_A:
            ai = -ai
        br = _tile(br_ptr, t, cols, T, C, m)
        bi = _tile(bi_ptr, t, cols, T, C, m)
        car, cai, cbr, cbi = tl.associative_scan((ar, ai, br, bi), 0, _combine_complex)
        outr = car * hr[None, :] - cai * hi[None, :] + cbr
        outi = car * hi[None, :] + cai * hr[None, :] + cbi
        offsets = t[:, None] * C + cols[None, :]
        tl.store(hr_ptr + offsets, outr.to(hr_ptr.dtype.element_ty), mask=m)
        tl.store(hi_ptr + offsets, outi.to(hi_ptr.dtype.element_ty), mask=m)
        hr = _last_row(outr, i, start + CHUNK - 1)
        hi = _last_row(outi, i, start + CHUNK - 1)




def scan_states(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, reverse: bool = False,
                conj_a: bool = False) -> torch.Tensor:
    """The kernel on ``a, b [T, ...]`` of one shape (contiguous copies are made), ``h0 [...]``: all states.
    ``reverse``: the adjoint ``h_t = a_{t+1} h_{t+1} + b_t``; ``conj_a``: with ``conj(a)`` (complex only)."""
    T = a.shape[0]
    C = a[0].numel() if T else 0
    if T == 0 or C == 0:
        return torch.zeros_like(b)
    block = block_c()
    grid = (triton.cdiv(C, block),)
    if a.is_complex():
        ar, ai, br, bi = (t.contiguous() for t in (a.real, a.imag, b.real, b.imag))
        hr, hi = torch.empty_like(br), torch.empty_like(bi)
        h0r, h0i = (hr, hi) if h0 is None else (h0.real.contiguous(), h0.imag.contiguous())
        _complex_scan_kernel[grid](ar, ai, br, bi, h0r, h0i, hr, hi, T, C, HAS_H0=h0 is not None,
                                   REVERSE=reverse, CONJ_A=conj_a, CHUNK=CHUNK, BLOCK_C=block)
        return torch.complex(hr, hi)
    a, b = a.contiguous(), b.contiguous()
    h = torch.empty_like(b)
    _scan_kernel[grid](a, b, h if h0 is None else h0.contiguous(), h, T, C, HAS_H0=h0 is not None,
                       REVERSE=reverse, CHUNK=CHUNK, BLOCK_C=block)
    return h


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0):
        shape = torch.broadcast_shapes(a.shape, b.shape, (1, *h0.shape) if h0 is not None else (1,))
        dtype = torch.promote_types(a.dtype, b.dtype)
        ctx.shapes = (a.shape, b.shape)
        a_full, b_full = a.to(dtype).expand(shape), b.to(dtype).expand(shape)
        h0_full = None if h0 is None else h0.to(dtype).expand(shape[1:])
        h = scan_states(a_full, b_full, h0_full)
        ctx.save_for_backward(a_full, h, h0_full)
        ctx.has_h0 = h0 is not None
        return h

    @staticmethod
    def backward(ctx, g):
        a, h, h0 = ctx.saved_tensors
        complex_ = a.is_complex()
        lam = scan_states(a, g.to(h.dtype), reverse=True, conj_a=complex_)
        first = torch.zeros_like(h[:1]) if h0 is None else h0.unsqueeze(0)
        h_prev = torch.cat([first, h[:-1]])
        a_shape, b_shape = ctx.shapes
        grad_a = _sum_to(lam * (h_prev.conj() if complex_ else h_prev), a_shape) if ctx.needs_input_grad[0] else None
        grad_b = _sum_to(lam, b_shape) if ctx.needs_input_grad[1] else None
        grad_h0 = None
        if ctx.has_h0 and ctx.needs_input_grad[2]:
            grad_h0 = (a[0].conj() if complex_ else a[0]) * lam[0]
        return grad_a, grad_b, grad_h0


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """All states ``h_0..h_{T-1}`` of ``h_t = a_t h_{t-1} + b_t`` along dim 0, ``h_{-1} = h0`` (or 0); ``a`` and ``b``
    broadcast against each other (real, or complex: S5). As ``chimera.models.scan.linear_scan``."""
    return _LinearScan.apply(a, b, h0)
