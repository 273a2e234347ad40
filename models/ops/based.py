"""Triton kernel for Based's linear attention within chunks, the Taylor feature map fused: forward and backward.

Reference: ``chimera.models.mixers.based.within_chunks`` (step 1 of ``based.based_chunked``), for every chunk::

    a_ls = q_l . k_s / sqrt(f),    K_ls = 1 + a_ls + a_ls^2 / 2 = phi(q_l) . phi(k_s),
    out_l = sum_{s <= l, doc(s) = doc(l)} K_ls v_s                       (v: the values with a column of ones)

The reference builds ``K`` as a ``[l, l]`` tensor for every (batch, head, chunk), and never the ``1 + f + f^2``
Taylor features; the kernel does neither: one program per (batch x head, chunk) loads ``q, k [l, f]``, ``v [l, e]``
and the chunk's document ids, keeps ``a`` and ``K`` in registers and writes ``out [l, e]``. The steps between
chunks (each chunk's state ``phi(k)^T v``, the scan over chunks, the read-out ``phi(q) S``) stay in torch, as in the
reference: they are plain matrix products. Backward, with ``M`` the mask of visible pairs::

    dv = (K * M)^T dout,   dK = dout v^T,   da = dK (1 + a) * M,   dq = da k / sqrt(f),   dk = da^T q / sqrt(f)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from chimera.models.ops.ssd import tile_width


@triton.jit
def _tiles(q_ptr, k_ptr, v_ptr, doc_ptr, chunk, L, F, E, scale, BL: tl.constexpr, BF: tl.constexpr,
           BE: tl.constexpr):
    """This chunk's ``q, k [BL, BF]``, ``v [BL, BE]``, ``a``, the masked kernel ``K * M`` and the mask ``[BL, BL]``
    (zero-padded past ``L, F, E``)."""
    ls = tl.arange(0, BL)
    fs = tl.arange(0, BF)
    es = tl.arange(0, BE)
    in_l = ls < L
    mf = in_l[:, None] & (fs < F)[None, :]
    me = in_l[:, None] & (es < E)[None, :]
    q = tl.load(q_ptr + chunk * L * F + ls[:, None] * F + fs[None, :], mask=mf, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + chunk * L * F + ls[:, None] * F + fs[None, :], mask=mf, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + chunk * L * E + ls[:, None] * E + es[None, :], mask=me, other=0.0).to(tl.float32)
    doc = tl.load(doc_ptr + chunk * L + ls, mask=in_l, other=-1)
    visible = (ls[:, None] >= ls[None, :]) & (doc[:, None] == doc[None, :]) & in_l[:, None] & in_l[None, :]
    a = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    kernel = tl.where(visible, 1.0 + a + 0.5 * a * a, 0.0)
    return q, k, v, a, kernel, visible, ls, fs, es, mf, me


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, doc_ptr, out_ptr, L, F, E, scale, BL: tl.constexpr, BF: tl.constexpr,
                    BE: tl.constexpr):
    chunk = tl.program_id(0)
    q, k, v, a, kernel, visible, ls, fs, es, mf, me = _tiles(q_ptr, k_ptr, v_ptr, doc_ptr, chunk, L, F, E, scale,
                                                             BL, BF, BE)
    out = tl.dot(kernel, v, input_precision="ieee")
    tl.store(out_ptr + chunk * L * E + ls[:, None] * E + es[None, :], out.to(out_ptr.dtype.element_ty), mask=me)


@triton.jit
def _backward_kernel(q_ptr, k_ptr, v_ptr, doc_ptr, dout_ptr, dq_ptr, dk_ptr, dv_ptr, L, F, E, scale,
                     BL: tl.constexpr, BF: tl.constexpr, BE: tl.constexpr):
    chunk = tl.program_id(0)
    q, k, v, a, kernel, visible, ls, fs, es, mf, me = _tiles(q_ptr, k_ptr, v_ptr, doc_ptr, chunk, L, F, E, scale,
                                                             BL, BF, BE)
    le = chunk * L * E + ls[:, None] * E + es[None, :]
    dout = tl.load(dout_ptr + le, mask=me, other=0.0).to(tl.float32)
    dv = tl.dot(tl.trans(kernel), dout, input_precision="ieee")
    dkernel = tl.dot(dout, tl.trans(v), input_precision="ieee")
    da = tl.where(visible, dkernel * (1.0 + a), 0.0) * scale
    dq = tl.dot(da, k, input_precision="ieee")
    dk = tl.dot(tl.trans(da), q, input_precision="ieee")
    lf = chunk * L * F + ls[:, None] * F + fs[None, :]
    tl.store(dq_ptr + lf, dq.to(dq_ptr.dtype.element_ty), mask=mf)
    tl.store(dk_ptr + lf, dk.to(dk_ptr.dtype.element_ty), mask=mf)
    tl.store(dv_ptr + le, dv.to(dv_ptr.dtype.element_ty), mask=me)


def _launch_args(q, v):
    (L, F), E = q.shape[-2:], v.shape[-1]
    return (L, F, E, 1.0 / math.sqrt(F)), dict(BL=tile_width(L), BF=tile_width(F), BE=tile_width(E))


class _WithinChunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc):
        q, k, v, doc = (t.contiguous() for t in (q, k, v, doc))
        out = torch.empty_like(v)
        chunks = q.shape[:-2].numel() if q.shape[-2] else 0
        sizes, blocks = _launch_args(q, v)
        if chunks:
            _forward_kernel[(chunks,)](q, k, v, doc, out, *sizes, **blocks)
        ctx.save_for_backward(q, k, v, doc)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, doc = ctx.saved_tensors
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        chunks = q.shape[:-2].numel() if q.shape[-2] else 0
        sizes, blocks = _launch_args(q, v)
        if chunks:
            _backward_kernel[(chunks,)](q, k, v, doc, dout.contiguous(), dq, dk, dv, *sizes, **blocks)
        return dq, dk, dv, None


def within_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document: torch.Tensor | None) -> torch.Tensor:
    """``based.within_chunks`` as a kernel: ``q, k [..., l, f]``, ``v [..., l, e]`` (the same leading dims),
    ``document`` (broadcastable to ``[..., l]``, a document index per position, or None: one document) ->
    ``out [..., l, e]``."""
    doc = (torch.zeros(q.shape[:-1], dtype=torch.int32, device=q.device) if document is None
           else document.to(torch.int32).expand(q.shape[:-1]))
    dtype = torch.promote_types(q.dtype, v.dtype)
    return _WithinChunks.apply(q.to(dtype), k.to(dtype), v.to(dtype), doc)
