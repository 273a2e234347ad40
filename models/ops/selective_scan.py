"""Triton kernel for Mamba-1's selective scan with its discretisation and read-out fused: no ``[s, b, d, N]`` tensor.

Reference: ``chimera.models.mixers.mamba.selective_scan`` (the paper's (2a), (2b), (4)), per channel ``d`` and state
entry ``n``::

    a_t = exp(Delta_t A)  (0 at a document's first token),   h_t = a_t h_{t-1} + Delta_t x_t B_t,   y_t = C_t . h_t

The reference materialises ``A_bar``, ``B_bar x`` and every ``h`` as ``[s, b, d, N]`` in fp32 (N = 16: sixteen times the
activations) and scans them. Here one program owns ``BLOCK_D`` channels of one batch row and walks time, the state
``h [BLOCK_D, N]`` in registers; it reads ``Delta, x [s, b, d]`` and ``B, C [s, b, heads, N]`` (a channel reads its
head's; Mamba-1 has one head) and writes ``y [s, b, d]``. It also keeps the state entering every ``CHUNK`` steps
(``[chunks, b, d, N]``), from which the backward recomputes a chunk's states, and the last state (decoding's).

Backward, the adjoint ``lambda_t = dy_t C_t + a_{t+1} lambda_{t+1}`` from the end, a chunk at a time: the chunk's states
are recomputed from its entering state into a scratch buffer of ``[CHUNK, BLOCK_D, N]`` per program, then::

    dDelta_t = sum_n lambda h_{t-1} a_t A + lambda x_t B_t,   dx_t = sum_n lambda Delta_t B_t,
    dB_t = sum_d lambda Delta_t x_t,   dC_t = sum_d dy_t h_t,   dA = sum_t lambda h_{t-1} a_t Delta_t

``dB``, ``dC`` (summed over a head's channels) and ``dA`` (over the batch) are written as one partial sum per program
and added up in torch: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D = 32  # channels per program
CHUNK = 64  # time steps between the saved states the backward restarts from


@triton.jit
def _step_inputs(dt_ptr, x_ptr, b_ptr, reset_ptr, t, row, d, n, in_d, A, Bsz, D, H, P, N):
    """``(a_t, Delta_t x_t B_t, Delta_t, x_t, B_t)`` for this program's channels at time ``t``."""
    at = (t * Bsz + row) * D + d
    dt = tl.load(dt_ptr + at, mask=in_d, other=0.0)
    x = tl.load(x_ptr + at, mask=in_d, other=0.0)
    m = in_d[:, None] & (n < N)[None, :]
    B = tl.load(b_ptr + ((t * Bsz + row) * H + d // P)[:, None] * N + n[None, :], mask=m, other=0.0)
    keep = tl.load(reset_ptr + t * Bsz + row) == 0
    a = tl.where(keep, tl.exp(dt[:, None] * A), 0.0)
    return a, (dt * x)[:, None] * B, dt, x, B


@triton.jit
def _forward_kernel(dt_ptr, x_ptr, a_ptr, b_ptr, c_ptr, reset_ptr, y_ptr, hs_ptr, last_ptr, T, Bsz, D, H, P, N,
                    BLOCK_D: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr):
    row, blk = tl.program_id(0), tl.program_id(1)
    d = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BN)
    in_d = d < D
    m = in_d[:, None] & (n < N)[None, :]
    A = tl.load(a_ptr + d[:, None] * N + n[None, :], mask=m, other=0.0)
    h = tl.zeros([BLOCK_D, BN], dtype=tl.float32)
    state_at = row * D * N + d[:, None] * N + n[None, :]
    for t in range(0, T):
        if t % CHUNK == 0:  # the state entering this chunk, for the backward
            tl.store(hs_ptr + (t // CHUNK) * Bsz * D * N + state_at, h, mask=m)
        a, u, dt, x, B = _step_inputs(dt_ptr, x_ptr, b_ptr, reset_ptr, t, row, d, n, in_d, A, Bsz, D, H, P, N)
        h = a * h + u
        C = tl.load(c_ptr + ((t * Bsz + row) * H + d // P)[:, None] * N + n[None, :], mask=m, other=0.0)
        tl.store(y_ptr + (t * Bsz + row) * D + d, tl.sum(h * C, axis=1), mask=in_d)
    tl.store(last_ptr + state_at, h, mask=m)


@triton.jit
def _backward_kernel(dt_ptr, x_ptr, a_ptr, b_ptr, c_ptr, reset_ptr, hs_ptr, dy_ptr, dlast_ptr, scratch_ptr,
                     ddt_ptr, dx_ptr, da_ptr, db_ptr, dc_ptr, T, Bsz, D, H, P, N, BLOCK_D: tl.constexpr,
                     BN: tl.constexpr, CHUNK: tl.constexpr):
    row, blk = tl.program_id(0), tl.program_id(1)
    d = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BN)
    in_d = d < D
    in_n = n < N
    m = in_d[:, None] & in_n[None, :]
    A = tl.load(a_ptr + d[:, None] * N + n[None, :], mask=m, other=0.0)
    state_at = row * D * N + d[:, None] * N + n[None, :]
    tile = d[:, None] * BN + n[None, :] - blk * BLOCK_D * BN  # a [BLOCK_D, BN] tile of this program's scratch
    scratch = scratch_ptr + (row * tl.num_programs(1) + blk) * CHUNK * BLOCK_D * BN
    partial = (row * tl.num_programs(1) + blk)  # this program's slot in the partial sums
    lam = tl.load(dlast_ptr + state_at, mask=m, other=0.0)  # the last state's own gradient (prefill's)
    dA = tl.zeros([BLOCK_D, BN], dtype=tl.float32)
    for back in range(0, tl.cdiv(T, CHUNK)):
        c = tl.cdiv(T, CHUNK) - 1 - back
        h_enter = tl.load(hs_ptr + c * Bsz * D * N + state_at, mask=m, other=0.0)
        h = h_enter
        for i in range(0, CHUNK):  # the chunk's states again, into scratch
            t = c * CHUNK + i
            if t < T:
                a, u, dt, x, B = _step_inputs(dt_ptr, x_ptr, b_ptr, reset_ptr, t, row, d, n, in_d, A, Bsz, D, H,
                                              P, N)
                h = a * h + u
                tl.store(scratch + i * BLOCK_D * BN + tile, h)
        for j in range(0, CHUNK):  # then back through them
            i = CHUNK - 1 - j
            t = c * CHUNK + i
            if t < T:
                a, u, dt, x, B = _step_inputs(dt_ptr, x_ptr, b_ptr, reset_ptr, t, row, d, n, in_d, A, Bsz, D, H,
                                              P, N)
                h_t = tl.load(scratch + i * BLOCK_D * BN + tile)
                if i > 0:
                    h_prev = tl.load(scratch + (i - 1) * BLOCK_D * BN + tile)
                else:
                    h_prev = h_enter
                step_at = (t * Bsz + row) * H + d // P
                C = tl.load(c_ptr + step_at[:, None] * N + n[None, :], mask=m, other=0.0)
                dy = tl.load(dy_ptr + (t * Bsz + row) * D + d, mask=in_d, other=0.0)
                lam += dy[:, None] * C
                tl.store(dc_ptr + ((partial * T + t) * N) + n, tl.sum(dy[:, None] * h_t, axis=0), mask=in_n)
                da = lam * h_prev * a  # d/d(Delta A) of a = exp(Delta A)
                dA += da * dt[:, None]
                ddt = tl.sum(da * A + lam * x[:, None] * B, axis=1)
                tl.store(ddt_ptr + (t * Bsz + row) * D + d, ddt, mask=in_d)
                tl.store(dx_ptr + (t * Bsz + row) * D + d, tl.sum(lam * dt[:, None] * B, axis=1), mask=in_d)
                tl.store(db_ptr + ((partial * T + t) * N) + n, tl.sum(lam * (dt * x)[:, None], axis=0), mask=in_n)
                lam = lam * a  # lambda_{t-1} gets a_t lambda_t
    tl.store(da_ptr + row * D * N + d[:, None] * N + n[None, :], dA, mask=m)


def _block_n(N: int) -> int:
    return triton.next_power_of_2(N)


def channels_per_program(heads: int, head_dim: int) -> int:
    """``BLOCK_D``, or with several heads the largest power of two up to it that divides the head width: a program's
    channels then lie in one head, whose ``B, C`` gradients its partial sums are."""
    if heads == 1:
        return BLOCK_D
    return min(BLOCK_D, head_dim & -head_dim)


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dt, x, A, B, C, reset, chunk, block_d):
        T, Bsz, D = dt.shape
        H, N = B.shape[-2:]
        P = D // H
        dt, x, A, B, C = (t.float().contiguous() for t in (dt, x, A, B, C))
        reset = reset.to(torch.int8).contiguous()
        y = torch.empty(T, Bsz, D, device=dt.device, dtype=torch.float32)
        states = torch.empty(max(triton.cdiv(T, chunk), 1), Bsz, D, N, device=dt.device, dtype=torch.float32)
        last = torch.zeros(Bsz, D, N, device=dt.device, dtype=torch.float32)
        grid = (Bsz, triton.cdiv(D, block_d))
        if T and Bsz and D:
            _forward_kernel[grid](dt, x, A, B, C, reset, y, states, last, T, Bsz, D, H, P, N, BLOCK_D=block_d,
                                  BN=_block_n(N), CHUNK=chunk)
        ctx.save_for_backward(dt, x, A, B, C, reset, states)
        ctx.chunk, ctx.block_d = chunk, block_d
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        dt, x, A, B, C, reset, states = ctx.saved_tensors
        T, Bsz, D = dt.shape
        H, N = B.shape[-2:]
        P, chunk, block_d, BN = D // H, ctx.chunk, ctx.block_d, _block_n(N)
        dy, dlast = dy.float().contiguous(), dlast.float().contiguous()  # autograd gives zeros for an unused output
        grid = (Bsz, triton.cdiv(D, block_d))
        programs = grid[0] * grid[1]
        ddt, dx = torch.zeros_like(dt), torch.zeros_like(x)
        dA = torch.zeros(Bsz, D, N, device=dt.device)
        # per program: its channels' sums over the head's channels it holds ([T, N]), added up below by head
        dB_part, dC_part = (torch.zeros(programs, T, N, device=dt.device) for _ in range(2))
        scratch = torch.empty(programs, chunk, block_d, BN, device=dt.device)
        if T and Bsz and D:
            _backward_kernel[grid](dt, x, A, B, C, reset, states, dy, dlast, scratch, ddt, dx, dA, dB_part,
                                   dC_part, T, Bsz, D, H, P, N, BLOCK_D=block_d, BN=BN, CHUNK=chunk)
        head_of_block = (torch.arange(grid[1], device=dt.device) * block_d) // P  # one head per program
        dB, dC = (torch.zeros(T, Bsz, H, N, device=dt.device).index_add_(
            2, head_of_block, part.view(Bsz, grid[1], T, N).permute(2, 0, 1, 3)) for part in (dB_part, dC_part))
        return ddt, dx, dA.sum(0), dB, dC, None, None, None


def selective_scan(dt: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   reset: torch.Tensor | None = None, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """``mamba.selective_scan`` as a kernel: ``Delta, x [s, b, H, P]``, ``A [H, P, N]``, ``B, C [s, b, H, N]``,
    ``reset [s, b]`` -> (``y [s, b, H, P]`` = ``C . h``, in fp32; the last state ``h [b, H, P, N]``)."""
    s, b, H, P = dt.shape
    N = A.shape[-1]
    if reset is None:
        reset = torch.zeros(s, b, dtype=torch.bool, device=dt.device)
    y, last = _SelectiveScan.apply(dt.flatten(2), x.flatten(2), A.flatten(0, 1), B, C, reset, chunk,
                                   channels_per_program(H, P))
    return y.view(s, b, H, P), last.view(b, H, P, N)
