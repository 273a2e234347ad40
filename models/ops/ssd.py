"""Triton kernel for Mamba-2's SSD within chunks: the diagonal blocks of the semiseparable matrix, forward and backward.

Reference: ``chimera.models.mixers.mamba2.within_chunks`` (step 1 of ``mamba2.ssd``), for every chunk::

    y_l = sum_{s <= l} (C_l . B_s) decay[l, s] xdt_s,      decay[l, s] = prod_{s < k <= l} a_k

The reference builds ``C B^T`` and ``decay`` as ``[q, q]`` tensors for every (batch, head, chunk); the kernel keeps
them in registers: one program per (batch x head, chunk) loads ``C, B [q, n]``, ``xdt [q, p]`` and the chunk's
cumulative log decays, and writes ``y [q, p]``. The steps between chunks (chunk states, the scan over chunks, the
read-out of the entering state) stay in torch, differentiated by autograd, as in the reference.

The decay from ``s`` to ``l`` is ``exp(cum_l - cum_s)`` (``cum``: the chunk's cumulative sum of ``log a``) when no
document starts in ``(s, l]``, else 0: a start (``log a = -inf`` in the reference) is kept as a segment count
``seg`` beside a finite ``cum``, so the kernel never subtracts infinities. Backward, with ``M = (C B^T) * decay``::

    dxdt = M^T dy,   dM = dy xdt^T (masked),   dC = (dM * decay) B,   dB = (dM * decay)^T C,
    dcum_l = sum_s (dM * M)[l, s] - sum_s (dM * M)[s, l]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tiles(c_ptr, b_ptr, x_ptr, cum_ptr, seg_ptr, chunk, Q, N, P, BQ: tl.constexpr, BN: tl.constexpr,
           BP: tl.constexpr):
    """This chunk's ``C, B [BQ, BN]``, ``xdt [BQ, BP]`` and ``decay [BQ, BQ]`` (zero-padded past ``Q, N, P``)."""
    q = tl.arange(0, BQ)
    n = tl.arange(0, BN)
    p = tl.arange(0, BP)
    in_q = q < Q
    mn = in_q[:, None] & (n < N)[None, :]
    mp = in_q[:, None] & (p < P)[None, :]
    C = tl.load(c_ptr + chunk * Q * N + q[:, None] * N + n[None, :], mask=mn, other=0.0).to(tl.float32)
    B = tl.load(b_ptr + chunk * Q * N + q[:, None] * N + n[None, :], mask=mn, other=0.0).to(tl.float32)
    X = tl.load(x_ptr + chunk * Q * P + q[:, None] * P + p[None, :], mask=mp, other=0.0).to(tl.float32)
    cum = tl.load(cum_ptr + chunk * Q + q, mask=in_q, other=0.0).to(tl.float32)
    seg = tl.load(seg_ptr + chunk * Q + q, mask=in_q, other=-1)
    keep = (q[:, None] >= q[None, :]) & (seg[:, None] == seg[None, :]) & in_q[:, None] & in_q[None, :]
    decay = tl.where(keep, tl.exp(tl.where(keep, cum[:, None] - cum[None, :], 0.0)), 0.0)
    return C, B, X, decay, q, n, p, mn, mp


@triton.jit
def _forward_kernel(c_ptr, b_ptr, x_ptr, cum_ptr, seg_ptr, y_ptr, Q, N, P, BQ: tl.constexpr, BN: tl.constexpr,
                    BP: tl.constexpr):
    chunk = tl.program_id(0)
    C, B, X, decay, q, n, p, mn, mp = _tiles(c_ptr, b_ptr, x_ptr, cum_ptr, seg_ptr, chunk, Q, N, P, BQ, BN, BP)
    M = tl.dot(C, tl.trans(B), input_precision="ieee") * decay
    y = tl.dot(M, X, input_precision="ieee")
    tl.store(y_ptr + chunk * Q * P + q[:, None] * P + p[None, :], y.to(y_ptr.dtype.element_ty), mask=mp)


@triton.jit
def _backward_kernel(c_ptr, b_ptr, x_ptr, cum_ptr, seg_ptr, dy_ptr, dc_ptr, db_ptr, dx_ptr, dcum_ptr, Q, N, P,
                     BQ: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr):
    chunk = tl.program_id(0)
    C, B, X, decay, q, n, p, mn, mp = _tiles(c_ptr, b_ptr, x_ptr, cum_ptr, seg_ptr, chunk, Q, N, P, BQ, BN, BP)
    dy = tl.load(dy_ptr + chunk * Q * P + q[:, None] * P + p[None, :], mask=mp, other=0.0).to(tl.float32)
    S = tl.dot(C, tl.trans(B), input_precision="ieee")
    M = S * decay
    dX = tl.dot(tl.trans(M), dy, input_precision="ieee")
    dM = tl.dot(dy, tl.trans(X), input_precision="ieee")
    dS = dM * decay
    dC = tl.dot(dS, B, input_precision="ieee")
    dB = tl.dot(tl.trans(dS), C, input_precision="ieee")
    dMM = dM * M
    dcum = tl.sum(dMM, axis=1) - tl.sum(dMM, axis=0)
    qn = chunk * Q * N + q[:, None] * N + n[None, :]
    tl.store(dc_ptr + qn, dC.to(dc_ptr.dtype.element_ty), mask=mn)
    tl.store(db_ptr + qn, dB.to(db_ptr.dtype.element_ty), mask=mn)
    tl.store(dx_ptr + chunk * Q * P + q[:, None] * P + p[None, :], dX.to(dx_ptr.dtype.element_ty), mask=mp)
    tl.store(dcum_ptr + chunk * Q + q, dcum.to(dcum_ptr.dtype.element_ty), mask=q < Q)


def tile_width(size: int) -> int:
    """The power-of-two tile covering ``size`` (padded and masked past it)."""
    return max(16, triton.next_power_of_2(size))  # tl.dot needs 16 or more along every dim


class _WithinChunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, C, B, xdt, cum, seg):
        lead, (Q, N), P = C.shape[:-2], C.shape[-2:], xdt.shape[-1]
        C, B, xdt, cum, seg = (t.contiguous() for t in (C, B, xdt, cum, seg))
        y = torch.empty(*lead, Q, P, dtype=xdt.dtype, device=xdt.device)
        chunks = cum.numel() // Q
        if chunks:
            _forward_kernel[(chunks,)](C, B, xdt, cum, seg, y, Q, N, P, BQ=tile_width(Q), BN=tile_width(N),
                                       BP=tile_width(P))
        ctx.save_for_backward(C, B, xdt, cum, seg)
        return y

    @staticmethod
    def backward(ctx, dy):
        C, B, xdt, cum, seg = ctx.saved_tensors
        (Q, N), P = C.shape[-2:], xdt.shape[-1]
        dC, dB, dX, dcum = (torch.empty_like(t) for t in (C, B, xdt, cum))
        chunks = cum.numel() // Q
        if chunks:
            _backward_kernel[(chunks,)](C, B, xdt, cum, seg, dy.contiguous(), dC, dB, dX, dcum, Q, N, P,
                                        BQ=tile_width(Q), BN=tile_width(N), BP=tile_width(P))
        return dC, dB, dX, dcum, None


def within_chunks(C: torch.Tensor, B: torch.Tensor, xdt: torch.Tensor, log_a: torch.Tensor) -> torch.Tensor:
    """``mamba2.within_chunks`` as a kernel: ``C, B [..., q, n]``, ``xdt [..., q, p]``, ``log_a [..., q]`` (``-inf`` at
    a document's first token) -> ``y [..., q, p]``."""
    starts = torch.isinf(log_a)
    cum = log_a.masked_fill(starts, 0.0).cumsum(-1)
    seg = starts.to(torch.int32).cumsum(-1, dtype=torch.int32)
    dtype = torch.promote_types(C.dtype, xdt.dtype)
    return _WithinChunks.apply(C.to(dtype), B.to(dtype), xdt.to(dtype), cum.to(dtype), seg)
