"""Triton kernel for RoPE: the rotation of q or k in one pass, forward and backward.

Reference: ``chimera.models.mixers.attention.apply_rope``. Pair ``i`` of the first ``rot`` dims, ``(x_i, x_{i+rot/2})``,
turns by the angle ``pos * theta_i`` whose cos and sin the tables hold; the other dims pass through::

    y_i = x_i cos - x_{i+rot/2} sin,   y_{i+rot/2} = x_{i+rot/2} cos + x_i sin        (in fp32, stored in x's dtype)

A rotation's transpose is the rotation by the opposite angle, so the backward is the same kernel with ``sin``
negated: ``dx = R(-angle) dy``. The tables get no gradient (they come from integer positions).

The reference makes about nine passes over ``[b, h, s, d]`` (cast, two halves' four products and two sums, two
concatenations, the cast back); here one program reads a ``[BLOCK_S, rot/2]`` tile of each half and of the tables and
writes the result, the pass-through dims copied beside them. Tables are ``[s, rot/2]`` (positions shared by the
batch) or ``[b, 1, s, rot/2]`` (a row's own positions: packed documents), read with a batch stride of 0 or not.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_S = 16


@triton.jit
def _rotate_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, S, D, HALF, table_b, table_s, SIGN: tl.constexpr,
                   BLOCK_S: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    in_s = rows < S
    i = tl.arange(0, BLOCK_HALF)
    m = in_s[:, None] & (i < HALF)[None, :]
    at = bh * S * D + rows[:, None] * D + i[None, :]
    x1 = tl.load(x_ptr + at, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + at + HALF, mask=m, other=0.0).to(tl.float32)
    t = (bh // H) * table_b + rows[:, None] * table_s + i[None, :]
    cos = tl.load(cos_ptr + t, mask=m, other=0.0)
    sin = tl.load(sin_ptr + t, mask=m, other=0.0) * SIGN
    tl.store(y_ptr + at, (x1 * cos - x2 * sin).to(y_ptr.dtype.element_ty), mask=m)
    tl.store(y_ptr + at + HALF, (x2 * cos + x1 * sin).to(y_ptr.dtype.element_ty), mask=m)
    if BLOCK_PASS > 0:  # the dims RoPE leaves alone (rope_fraction < 1)
        j = tl.arange(0, BLOCK_PASS)
        mp = in_s[:, None] & (j < D - 2 * HALF)[None, :]
        at_pass = bh * S * D + rows[:, None] * D + 2 * HALF + j[None, :]
        tl.store(y_ptr + at_pass, tl.load(x_ptr + at_pass, mask=mp, other=0.0), mask=mp)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """``x [b, h, s, d]`` turned by the tables' angles (``sign=-1``: by their opposites), as a new contiguous tensor."""
    b, h, s, d = x.shape
    half = cos.shape[-1]
    x = x.contiguous()
    y = torch.empty_like(x)
    if cos.dim() == 4:  # [b, 1, s, half]: each row's own positions
        cos, sin = cos[:, 0], sin[:, 0]
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    table_b, table_s = (cos.stride(0), cos.stride(1)) if cos.dim() == 3 else (0, cos.stride(0))
    passed = d - 2 * half
    if x.numel():
        _rotate_kernel[(b * h, triton.cdiv(s, BLOCK_S))](
            x, cos, sin, y, h, s, d, half, table_b, table_s, SIGN=sign, BLOCK_S=BLOCK_S,
            BLOCK_HALF=triton.next_power_of_2(half), BLOCK_PASS=triton.next_power_of_2(passed) if passed else 0)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, -1.0), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x [b, h, s, d]`` with tables ``[s, rot/2]`` or ``[b, 1, s, rot/2]`` (``rot >= 2``), forward and
    backward fused."""
    return _Rope.apply(x, cos, sin)
