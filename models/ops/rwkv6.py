"""Triton kernel for RWKV-6's WKV within chunks (data-dependent decay per key channel): forward and backward.

Reference: ``chimera.models.mixers.rwkv6.within_chunks`` (step 1 of ``rwkv6.wkv``), for every chunk::

    e_tsn = exp(before_tn - cum_sn)    (s < t, same document; else 0)    before = cum - log w: log prod_{j<t} w_j
    A_ts  = sum_n r_tn k_sn e_tsn,     y_t = sum_s A_ts v_s

``e`` is the decay of key channel ``n`` from ``s`` to ``t``, a difference of cumulative log decays that is never
positive, so nothing overflows; because it differs per channel, ``A`` is no plain product ``r k^T``. The reference
builds ``e`` as a ``[q, q, n]`` tensor for every (batch, head, chunk) in memory; the kernel keeps it in registers:
one program per (batch x head, chunk) loads ``r, k, before, cum [q, n]``, ``v [q, m]`` and the chunk's document
ids, and writes ``y [q, m]``. The bonus ``u``, the chunk states and the scan between chunks stay in torch, as in
the reference; ``before`` and ``cum`` are torch's cumulative sums of ``log w``, so autograd carries their gradients
back to it. Backward, with ``M`` the visible pairs::

    dA = (dy v^T) * M,   dv = A^T dy,   G_tsn = dA_ts e_tsn,
    dr_tn = sum_s G_tsn k_sn,   dk_sn = sum_t G_tsn r_tn,
    dbefore_tn = sum_s G_tsn r_tn k_sn,   dcum_sn = -sum_t G_tsn r_tn k_sn
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from chimera.models.ops.ssd import tile_width


@triton.jit
def _tiles(r_ptr, k_ptr, v_ptr, before_ptr, cum_ptr, doc_ptr, chunk, Q, N, M, BQ: tl.constexpr, BN: tl.constexpr,
           BM: tl.constexpr):
    """This chunk's ``r, k [BQ, BN]``, ``v [BQ, BM]``, the decays ``e [BQ, BQ, BN]`` (0 where not visible) and the
    mask of visible pairs ``[BQ, BQ]`` (zero-padded past ``Q, N, M``)."""
    qs = tl.arange(0, BQ)
    ns = tl.arange(0, BN)
    ms = tl.arange(0, BM)
    in_q = qs < Q
    mn = in_q[:, None] & (ns < N)[None, :]
    mm = in_q[:, None] & (ms < M)[None, :]
    qn = chunk * Q * N + qs[:, None] * N + ns[None, :]
    r = tl.load(r_ptr + qn, mask=mn, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + qn, mask=mn, other=0.0).to(tl.float32)
    before = tl.load(before_ptr + qn, mask=mn, other=0.0).to(tl.float32)
    cum = tl.load(cum_ptr + qn, mask=mn, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + chunk * Q * M + qs[:, None] * M + ms[None, :], mask=mm, other=0.0).to(tl.float32)
    doc = tl.load(doc_ptr + chunk * Q + qs, mask=in_q, other=-1)
    visible = (qs[:, None] > qs[None, :]) & (doc[:, None] == doc[None, :]) & in_q[:, None] & in_q[None, :]
    gap = tl.where(visible[:, :, None], before[:, None, :] - cum[None, :, :], float("-inf"))
    return r, k, v, tl.exp(gap), visible, qs, ns, ms, mn, mm, qn


@triton.jit
def _forward_kernel(r_ptr, k_ptr, v_ptr, before_ptr, cum_ptr, doc_ptr, out_ptr, Q, N, M, BQ: tl.constexpr,
                    BN: tl.constexpr, BM: tl.constexpr):
    chunk = tl.program_id(0)
    r, k, v, e, visible, qs, ns, ms, mn, mm, qn = _tiles(r_ptr, k_ptr, v_ptr, before_ptr, cum_ptr, doc_ptr, chunk,
                                                         Q, N, M, BQ, BN, BM)
    scores = tl.sum(r[:, None, :] * k[None, :, :] * e, axis=2)  # A [t, s]
    out = tl.dot(scores, v, input_precision="ieee")
    tl.store(out_ptr + chunk * Q * M + qs[:, None] * M + ms[None, :], out.to(out_ptr.dtype.element_ty), mask=mm)


@triton.jit
def _backward_kernel(r_ptr, k_ptr, v_ptr, before_ptr, cum_ptr, doc_ptr, dout_ptr, dr_ptr, dk_ptr, dv_ptr,
                     dbefore_ptr, dcum_ptr, Q, N, M, BQ: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
    chunk = tl.program_id(0)
    r, k, v, e, visible, qs, ns, ms, mn, mm, qn = _tiles(r_ptr, k_ptr, v_ptr, before_ptr, cum_ptr, doc_ptr, chunk,
                                                         Q, N, M, BQ, BN, BM)
    qm = chunk * Q * M + qs[:, None] * M + ms[None, :]
    dout = tl.load(dout_ptr + qm, mask=mm, other=0.0).to(tl.float32)
    scores = tl.sum(r[:, None, :] * k[None, :, :] * e, axis=2)
    dv = tl.dot(tl.trans(scores), dout, input_precision="ieee")
    dscores = tl.where(visible, tl.dot(dout, tl.trans(v), input_precision="ieee"), 0.0)
    g = dscores[:, :, None] * e  # G [t, s, n]
    dr = tl.sum(g * k[None, :, :], axis=1)
    dk = tl.sum(g * r[:, None, :], axis=0)
    through_decay = g * r[:, None, :] * k[None, :, :]
    tl.store(dr_ptr + qn, dr.to(dr_ptr.dtype.element_ty), mask=mn)
    tl.store(dk_ptr + qn, dk.to(dk_ptr.dtype.element_ty), mask=mn)
    tl.store(dv_ptr + qm, dv.to(dv_ptr.dtype.element_ty), mask=mm)
    tl.store(dbefore_ptr + qn, tl.sum(through_decay, axis=1).to(dbefore_ptr.dtype.element_ty), mask=mn)
    tl.store(dcum_ptr + qn, (-tl.sum(through_decay, axis=0)).to(dcum_ptr.dtype.element_ty), mask=mn)


def _launch_args(r, v):
    (Q, N), M = r.shape[-2:], v.shape[-1]
    return (Q, N, M), dict(BQ=tile_width(Q), BN=tile_width(N), BM=tile_width(M))


class _WithinChunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, k, v, before, cum, doc):
        r, k, v, before, cum, doc = (t.contiguous() for t in (r, k, v, before, cum, doc))
        out = torch.empty_like(v)
        chunks = r.shape[:-2].numel() if r.shape[-2] else 0
        sizes, blocks = _launch_args(r, v)
        if chunks:
            _forward_kernel[(chunks,)](r, k, v, before, cum, doc, out, *sizes, **blocks)
        ctx.save_for_backward(r, k, v, before, cum, doc)
        return out

    @staticmethod
    def backward(ctx, dout):
        r, k, v, before, cum, doc = ctx.saved_tensors
        dr, dk, dv, dbefore, dcum = (torch.empty_like(t) for t in (r, k, v, before, cum))
        chunks = r.shape[:-2].numel() if r.shape[-2] else 0
        sizes, blocks = _launch_args(r, v)
        if chunks:
            _backward_kernel[(chunks,)](r, k, v, before, cum, doc, dout.contiguous(), dr, dk, dv, dbefore, dcum,
                                        *sizes, **blocks)
        return dr, dk, dv, dbefore, dcum, None


def within_chunks(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, before: torch.Tensor, cum: torch.Tensor,
                  document: torch.Tensor | None) -> torch.Tensor:
    """``rwkv6.within_chunks`` as a kernel: ``r, k, before, cum [..., q, n]``, ``v [..., q, m]`` (the same leading
    dims), ``document`` (broadcastable to ``[..., q]``, a document index per position, or None: one document) ->
    ``y [..., q, m]``."""
    doc = (torch.zeros(r.shape[:-1], dtype=torch.int32, device=r.device) if document is None
           else document.to(torch.int32).expand(r.shape[:-1]))
    dtype = torch.promote_types(torch.promote_types(r.dtype, v.dtype), before.dtype)
    return _WithinChunks.apply(*(t.to(dtype) for t in (r, k, v, before, cum)), doc)
