"""Triton kernel for Mamba-2's SSD within chunks: the diagonal blocks of the semiseparable matrix, forward and backward.

Reference: ``chimera.models.mixers.mamba2.within_chunks`` (step 1 of ``mamba2.ssd``), for every chunk::

    y_l = sum_{s <= l} (C_l . B_s) decay[l, s] xdt_s,      decay[l, s] = prod_{s < k <= l} a_k

The reference builds ``C B^T`` and ``decay`` as ``[q, q]`` tensors for every (batch, head, chunk); the kernels keep
them in registers a ``[BLOCK, BLOCK]`` tile at a time, the chunk cut into blocks of ``BLOCK`` positions, as
FlashAttention cuts a sequence: the forward program of (batch x head x chunk, query block ``L``) loads
``C_L [BLOCK, n]`` and adds up ``(C_L B_S^T * decay[L, S]) xdt_S`` over the causal key blocks ``S <= L``; what a
program holds is bounded by the block, not the chunk (Mamba-2's chunk is 256). The steps between chunks (chunk states,
the scan over chunks, the read-out of the entering state) stay in torch, differentiated by autograd, as in the
reference.

The decay from ``s`` to ``l`` is ``exp(cum_l - cum_s)`` (``cum``: the chunk's cumulative sum of ``log a``) when no
document starts in ``(s, l]``, else 0: a start (``log a = -inf`` in the reference) is kept as a segment count
``seg`` beside a finite ``cum``, so the kernel never subtracts infinities. Backward, with ``M = (C B^T) * decay``::

    dxdt = M^T dy,   dM = dy xdt^T (masked),   dC = (dM * decay) B,   dB = (dM * decay)^T C,
    dcum_l = sum_s (dM * M)[l, s] - sum_s (dM * M)[s, l]

in two kernels, each a loop over blocks that writes its own rows only: one per query block ``L`` (``dC_L`` and the
row sums, over ``S <= L``), one per key block ``S`` (``dB_S``, ``dxdt_S`` and the column sums, over ``L >= S``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from chimera.models.mixers import mamba2

BLOCK = 32  # positions per tile: tl.dot needs 16 or more; C, B [BLOCK, n] and [BLOCK, BLOCK] products in registers


@triton.jit
def _rows(ptr, chunk, rows, Q, W, BW: tl.constexpr):
    """Rows ``rows`` of this chunk's ``[Q, W]`` matrix as ``[len(rows), BW]`` fp32, zero past ``Q`` and ``W``."""
    cols = tl.arange(0, BW)
    m = (rows < Q)[:, None] & (cols < W)[None, :]
    return tl.load(ptr + chunk * Q * W + rows[:, None] * W + cols[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, value, chunk, rows, Q, W, BW: tl.constexpr):
    cols = tl.arange(0, BW)
    m = (rows < Q)[:, None] & (cols < W)[None, :]
    tl.store(ptr + chunk * Q * W + rows[:, None] * W + cols[None, :], value.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _decay(cum_ptr, seg_ptr, chunk, l_pos, s_pos, Q):
    """``decay[l, s] = exp(cum_l - cum_s)`` for ``l >= s`` in one document, else 0, for the blocks of positions
    ``l_pos``, ``s_pos``."""
    in_l, in_s = l_pos < Q, s_pos < Q
    cum_l = tl.load(cum_ptr + chunk * Q + l_pos, mask=in_l, other=0.0).to(tl.float32)
    cum_s = tl.load(cum_ptr + chunk * Q + s_pos, mask=in_s, other=0.0).to(tl.float32)
    seg_l = tl.load(seg_ptr + chunk * Q + l_pos, mask=in_l, other=-1)
    seg_s = tl.load(seg_ptr + chunk * Q + s_pos, mask=in_s, other=-1)
    keep = (l_pos[:, None] >= s_pos[None, :]) & (seg_l[:, None] == seg_s[None, :]) & in_l[:, None] & in_s[None, :]
    return tl.where(keep, tl.exp(tl.where(keep, cum_l[:, None] - cum_s[None, :], 0.0)), 0.0)


@triton.jit
def _forward_kernel(c_ptr, b_ptr, x_ptr, cum_ptr, seg_ptr, y_ptr, Q, N, P, BLOCK: tl.constexpr, BN: tl.constexpr,
                    BP: tl.constexpr):
    chunk, block = tl.program_id(0), tl.program_id(1)
    l_pos = block * BLOCK + tl.arange(0, BLOCK)
    C = _rows(c_ptr, chunk, l_pos, Q, N, BN)
    y = tl.zeros([BLOCK, BP], dtype=tl.float32)
    for key_block in range(0, block + 1):  # causal: the key blocks up to this one
        s_pos = key_block * BLOCK + tl.arange(0, BLOCK)
        M = tl.dot(C, tl.trans(_rows(b_ptr, chunk, s_pos, Q, N, BN)), input_precision="ieee")
        M = M * _decay(cum_ptr, seg_ptr, chunk, l_pos, s_pos, Q)
        y += tl.dot(M, _rows(x_ptr, chunk, s_pos, Q, P, BP), input_precision="ieee")
    _store_rows(y_ptr, y, chunk, l_pos, Q, P, BP)


@triton.jit
def _backward_query_kernel(c_ptr, b_ptr, x_ptr, cum_ptr, seg_ptr, dy_ptr, dc_ptr, drow_ptr, Q, N, P,
                           BLOCK: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr):
    """For query block ``L``: ``dC_L = sum_S (dM * decay) B_S`` and the row sums of ``dM * M``."""
    chunk, block = tl.program_id(0), tl.program_id(1)
    l_pos = block * BLOCK + tl.arange(0, BLOCK)
    C = _rows(c_ptr, chunk, l_pos, Q, N, BN)
    dy = _rows(dy_ptr, chunk, l_pos, Q, P, BP)
    dC = tl.zeros([BLOCK, BN], dtype=tl.float32)
    row_sums = tl.zeros([BLOCK], dtype=tl.float32)
    for key_block in range(0, block + 1):
        s_pos = key_block * BLOCK + tl.arange(0, BLOCK)
        B = _rows(b_ptr, chunk, s_pos, Q, N, BN)
        S = tl.dot(C, tl.trans(B), input_precision="ieee")
        dS = tl.dot(dy, tl.trans(_rows(x_ptr, chunk, s_pos, Q, P, BP)), input_precision="ieee")
        dS = dS * _decay(cum_ptr, seg_ptr, chunk, l_pos, s_pos, Q)  # dM * decay
        dC += tl.dot(dS, B, input_precision="ieee")
        row_sums += tl.sum(dS * S, axis=1)  # dM * M = (dM * decay) * S
    _store_rows(dc_ptr, dC, chunk, l_pos, Q, N, BN)
    tl.store(drow_ptr + chunk * Q + l_pos, row_sums, mask=l_pos < Q)


@triton.jit
def _backward_key_kernel(c_ptr, b_ptr, x_ptr, cum_ptr, seg_ptr, dy_ptr, db_ptr, dx_ptr, dcol_ptr, Q, N, P, blocks,
                         BLOCK: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr):
    """For key block ``S``: ``dB_S = sum_L (dM * decay)^T C_L``, ``dxdt_S = sum_L M^T dy_L`` and the column sums of
    ``dM * M``."""
    chunk, block = tl.program_id(0), tl.program_id(1)
    s_pos = block * BLOCK + tl.arange(0, BLOCK)
    B = _rows(b_ptr, chunk, s_pos, Q, N, BN)
    X = _rows(x_ptr, chunk, s_pos, Q, P, BP)
    dB = tl.zeros([BLOCK, BN], dtype=tl.float32)
    dX = tl.zeros([BLOCK, BP], dtype=tl.float32)
    col_sums = tl.zeros([BLOCK], dtype=tl.float32)
    for query_block in range(block, blocks):  # the query blocks that see this one
        l_pos = query_block * BLOCK + tl.arange(0, BLOCK)
        C = _rows(c_ptr, chunk, l_pos, Q, N, BN)
        dy = _rows(dy_ptr, chunk, l_pos, Q, P, BP)
        decay = _decay(cum_ptr, seg_ptr, chunk, l_pos, s_pos, Q)
        S = tl.dot(C, tl.trans(B), input_precision="ieee")
        dS = tl.dot(dy, tl.trans(X), input_precision="ieee") * decay
        dB += tl.dot(tl.trans(dS), C, input_precision="ieee")
        dX += tl.dot(tl.trans(S * decay), dy, input_precision="ieee")
        col_sums += tl.sum(dS * S, axis=0)
    _store_rows(db_ptr, dB, chunk, s_pos, Q, N, BN)
    _store_rows(dx_ptr, dX, chunk, s_pos, Q, P, BP)
    tl.store(dcol_ptr + chunk * Q + s_pos, col_sums, mask=s_pos < Q)


def tile_width(size: int) -> int:
    """The power-of-two tile covering ``size`` (padded and masked past it)."""
    return max(16, triton.next_power_of_2(size))  # tl.dot needs 16 or more along every dim


class _WithinChunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, C, B, xdt, cum, seg, block):
        lead, (Q, N), P = C.shape[:-2], C.shape[-2:], xdt.shape[-1]
        C, B, xdt, cum, seg = (t.contiguous() for t in (C, B, xdt, cum, seg))
        y = torch.empty(*lead, Q, P, dtype=xdt.dtype, device=xdt.device)
        grid = (cum.numel() // Q, triton.cdiv(Q, block))
        if grid[0]:
            _forward_kernel[grid](C, B, xdt, cum, seg, y, Q, N, P, BLOCK=block, BN=tile_width(N), BP=tile_width(P))
        ctx.save_for_backward(C, B, xdt, cum, seg)
        ctx.block = block
        return y

    @staticmethod
    def backward(ctx, dy):
        C, B, xdt, cum, seg = ctx.saved_tensors
        (Q, N), P, block = C.shape[-2:], xdt.shape[-1], ctx.block
        dC, dB, dX = (torch.empty_like(t) for t in (C, B, xdt))
        row_sums, col_sums = (torch.empty(cum.shape, dtype=torch.float32, device=cum.device) for _ in range(2))
        grid = (cum.numel() // Q, triton.cdiv(Q, block))
        if grid[0]:
            dy = dy.contiguous()
            widths = dict(BLOCK=block, BN=tile_width(N), BP=tile_width(P))
            _backward_query_kernel[grid](C, B, xdt, cum, seg, dy, dC, row_sums, Q, N, P, **widths)
            _backward_key_kernel[grid](C, B, xdt, cum, seg, dy, dB, dX, col_sums, Q, N, P, grid[1], **widths)
        return dC, dB, dX, (row_sums - col_sums).to(cum.dtype), None, None


def within_chunks(C: torch.Tensor, B: torch.Tensor, xdt: torch.Tensor, log_a: torch.Tensor,
                  block: int = BLOCK) -> torch.Tensor:
    """``mamba2.within_chunks`` as a kernel: ``C, B [..., q, n]``, ``xdt [..., q, p]``, ``log_a [..., q]`` (``-inf`` at
    a document's first token) -> ``y [..., q, p]``; ``block``: positions per tile (a power of two, 16 or more)."""
    # the cumulative log decay after the chunk's first entry, which no product includes (so its gradient is exactly
    # 0, where the kernels' row sums less column sums would leave their rounding)
    cum, seg = mamba2.cumulative_log_decay(log_a)
    seg = seg.to(torch.int32)
    dtype = torch.promote_types(C.dtype, xdt.dtype)
    return _WithinChunks.apply(C.to(dtype), B.to(dtype), xdt.to(dtype), cum.to(dtype), seg, block)
