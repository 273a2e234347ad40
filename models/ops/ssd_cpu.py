"""Mamba-2's SSD on CPU: the reference's math (``chimera.models.mixers.mamba2.ssd``) with its backward written out.

Autograd through the reference keeps every intermediate of every elementwise step and makes a layout copy for each
contraction; on a CPU those passes over memory, not the matmuls, are most of the SSD's time. Here the four steps are
one ``autograd.Function`` whose forward writes each result straight into the layout the next step reads (``out=``) and
whose backward is the chain rule by hand, with ``M = (C B^T) * decay`` the masked ``[q, q]`` matrix of a chunk::

    1. Y_w = M xdt                          dxdt = M^T dY,  dM = dY xdt^T,  d(C B^T) = sum_heads dM * decay,
                                            dcum_l = sum_s (dM * M)[l, s] - sum_s (dM * M)[s, l]
    2. S_c = B_c^T (to_end * xdt_c)         dX_s = B_c dS_c,  dB_c = X_s dS_c^T
    3. E_c = whole_{c-1} E_{c-1} + S_{c-1}  dE_{c-1} += whole_{c-1} dE_c,  dS_{c-1} = dE_c,
                                            dwhole_{c-1} = <dE_c, E_{c-1}>
    4. Y = Y_w + from_start * (C_c E_c)     dE_c = C_c^T (from_start * dY),  dC_c = (from_start * dY) E_c^T

(``E_c`` the state entering chunk ``c``, ``E_0 = 0``.) The decays (``cum``, ``to_end``, ``from_start``, ``whole``:
``mamba2.cumulative_log_decay``, ``mamba2.boundary_decays``) are small ``[..., q]`` tensors computed by autograd
outside. Steps 2 and 4 contract ``B`` and ``C`` with all of a group's heads at once, so their operands are laid out
``[b, g, c, q, (h/g, p)]``, step 1's ``[b, g, h/g, c, q, p]``; the output is written ``[c, q, b, g, h/g, p]``, which is
``[s, b, h, p]`` as a view. Without context parallelism only: there the states cross ranks
(``chimera.parallel.context``), which the reference does.

``within_chunks`` is step 1 alone, for the reference's own use on CPU under context parallelism.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from chimera.models.mixers import mamba2

# torch's CPU exp takes a slow path where its result is below the smallest normal float (1.2e-38) or overflows: on
# the 2-core AVX-512 machine 116-158x slower per element at -88..-100, 65-69x at -110, 17-19x at -inf and 50x at +90
# than at -87; and a denormal operand makes a batched matmul 142x slower, a multiply 16x (benchmarks/cpu_exp.py,
# benchmarks/RESULTS.md). So the decay's exponent is clamped to [EXP_FLOOR, 0] (it is <= 0 wherever the decay is
# kept) and every decay below exp(EXP_FLOOR + 1) = 2.4e-26 is then set to 0, so that neither the exp nor the products
# of the decays ever meet a denormal: such a decay is 26 orders of magnitude below the one each row gives its own
# position (1), and 0 is what exp underflows to. The hidden entries are zeroed after the exp, by a multiply with the
# kept ones (7x faster than masked_fill_ with a broadcast [q, q] mask), not set to -inf before.
EXP_FLOOR = -60.0
NEGLIGIBLE_DECAY = math.exp(EXP_FLOOR + 1)


def _decay_and_products(C, B, xdt, cum, document):
    """Step 1's forward: (``decay``, ``M = (C B^T) * decay``, ``Y_w = M xdt``), the ``[q, q]`` tensors built in
    place."""
    CB = C @ B.transpose(-1, -2)  # [..., l, s], once per group
    decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).clamp_(EXP_FLOOR, 0.0).exp_()  # <= 0 where not hidden
    F.threshold_(decay, NEGLIGIBLE_DECAY, 0.0).mul_(~mamba2.hidden(document))
    M = CB * decay
    return decay, M, M @ xdt


def _within_backward(dy, C, B, xdt, decay, M):
    """Step 1's backward: (``dC``, ``dB``, ``dxdt``, ``dcum``); ``dM``'s buffer reused for ``dM * M``."""
    dxdt = (M.transpose(-1, -2) @ dy).sum_to_size(xdt.shape)
    dM = dy @ xdt.transpose(-1, -2)
    group_shape = (*torch.broadcast_shapes(C.shape[:-2], B.shape[:-2]), *M.shape[-2:])  # C B^T's
    dCB = (dM * decay).sum_to_size(group_shape)
    dcum = dM.mul_(M)
    dcum = dcum.sum(-1) - dcum.sum(-2)
    dC = (dCB @ B).sum_to_size(C.shape)
    dB = (dCB.transpose(-1, -2) @ C).sum_to_size(B.shape)
    return dC, dB, dxdt, dcum


class _WithinChunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, C, B, xdt, cum, document):
        decay, M, y = _decay_and_products(C, B, xdt, cum, document)
        ctx.save_for_backward(C, B, xdt, decay, M)
        return y

    @staticmethod
    def backward(ctx, dy):
        return (*_within_backward(dy, *ctx.saved_tensors), None)


def within_chunks(C: torch.Tensor, B: torch.Tensor, xdt: torch.Tensor, log_a: torch.Tensor) -> torch.Tensor:
    """``mamba2.within_chunks`` (``C, B [..., q, n]`` broadcast against ``xdt [..., q, p]``, ``log_a [..., q]``)."""
    cum, document = mamba2.cumulative_log_decay(log_a)
    return _WithinChunks.apply(C, B, xdt, cum, document)


def _chunked_by_group(t: torch.Tensor, groups: int) -> torch.Tensor:
    """A view of ``t [s, b, h, ...]`` as ``[b, g, h/g, s, ...]``, the order of ``ssd``'s chunked layout."""
    return t.movedim(0, 2).unflatten(1, (groups, t.shape[2] // groups))


class _ChunkedSSD(torch.autograd.Function):
    """Steps 1-4 of ``mamba2.ssd`` at cp = 1 and the skip: ``x [s, b, h, p]``, ``dt [s, b, h]``, ``D [h]`` (or None),
    ``B, C [b, g, 1, c, q, n]``, step 1's ``cum, document [b, g, h/g, c, q]``, ``to_end, from_start`` of the same
    shape and ``whole [b, g, h/g, c]`` -> ``y [c, q, b, g, h/g, p]``. ``xdt = dt x`` is written straight into its
    chunked layout ``[b, g, h/g, c, q, p]`` (zero past ``s``) and ``D x`` added into ``y`` in place, so neither has a
    buffer or a pass of its own; backward: ``dx = dt dxdt + D dy``, ``ddt = sum_p x dxdt``, ``dD = sum x dy``."""

    @staticmethod
    def forward(ctx, x, dt, D, B, C, cum, document, to_end, from_start, whole):
        s, p = x.shape[0], x.shape[-1]
        b, g, hg, c, q = cum.shape
        xdt = (x.new_zeros if c * q > s else x.new_empty)(b, g, hg, c * q, p)
        torch.mul(_chunked_by_group(x, g), _chunked_by_group(dt, g).unsqueeze(-1), out=xdt[:, :, :, :s])
        xdt = xdt.view(b, g, hg, c, q, p)
        decay, M, y_within = _decay_and_products(C, B, xdt, cum, document)
        # 2. the chunks' own states S = B^T (to_end * xdt), xdt scaled straight into [b, g, c, q, (h/g, p)]
        x_scaled = xdt.new_empty(b, g, c, q, hg, p)
        torch.mul(xdt.permute(0, 1, 3, 4, 2, 5), to_end.permute(0, 1, 3, 4, 2).unsqueeze(-1), out=x_scaled)
        S = B.squeeze(2).transpose(-1, -2) @ x_scaled.view(b, g, c, q, hg * p)  # [b, g, c, n, (h/g, p)]
        # 3. the state entering each chunk
        whole_by_head = whole.permute(0, 1, 3, 2)[:, :, :, None, :, None]  # [b, g, c, 1, h/g, 1]
        E = torch.empty_like(S)
        E[:, :, 0] = 0
        E_by_head, S_by_head = E.unflatten(-1, (hg, p)), S.unflatten(-1, (hg, p))  # views
        for i in range(1, c):
            E_by_head[:, :, i].copy_(S_by_head[:, :, i - 1]).addcmul_(E_by_head[:, :, i - 1],
                                                                        whole_by_head[:, :, i - 1])
        # 4. read out: y = y_within + from_start * (C E), written as [c, q, b, g, h/g, p]
        read = (C.squeeze(2) @ E).view(b, g, c, q, hg, p)
        y = xdt.new_empty(c, q, b, g, hg, p)
        torch.mul(read.permute(2, 3, 0, 1, 4, 5), from_start.permute(3, 4, 0, 1, 2).unsqueeze(-1), out=y)
        y += y_within.permute(3, 4, 0, 1, 2, 5)
        if D is not None:  # the skip, in place: y [s, b, h, p] += D x
            y.view(c * q, b, g * hg, p)[:s].addcmul_(x, D.unsqueeze(-1))
        ctx.save_for_backward(x, dt, D, xdt, B, C, decay, M, to_end, from_start, whole, x_scaled, E, read)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, dt, D, xdt, B, C, decay, M, to_end, from_start, whole, x_scaled, E, read = ctx.saved_tensors
        b, g, hg, c, q, p = xdt.shape
        dC, dB, dxdt, dcum = _within_backward(dy.permute(2, 3, 4, 0, 1, 5).contiguous(), C, B, xdt, decay, M)
        B2, C2 = B.squeeze(2), C.squeeze(2)  # [b, g, c, q, n]
        # 4.
        dy_pos = dy.permute(2, 3, 0, 1, 4, 5)  # [b, g, c, q, h/g, p]
        d_read = xdt.new_empty(b, g, c, q, hg, p)
        torch.mul(dy_pos, from_start.permute(0, 1, 3, 4, 2).unsqueeze(-1), out=d_read)
        d_from_start = (dy_pos * read).sum(-1).permute(0, 1, 4, 2, 3)  # [b, g, h/g, c, q]
        d_read = d_read.view(b, g, c, q, hg * p)
        dE = C2.transpose(-1, -2) @ d_read  # [b, g, c, n, (h/g, p)]
        dC2 = d_read @ E.transpose(-1, -2)
        # 3. backwards over chunks; dE[c] is complete once the chunks after it have added theirs
        whole_by_head = whole.permute(0, 1, 3, 2)[:, :, :, None, :, None]
        dE_by_head = dE.unflatten(-1, (hg, p))  # a view
        for i in range(c - 1, 0, -1):
            dE_by_head[:, :, i - 1].addcmul_(dE_by_head[:, :, i], whole_by_head[:, :, i - 1])
        d_whole = torch.zeros_like(whole)
        d_whole[..., :-1] = (dE[:, :, 1:] * E[:, :, :-1]).unflatten(-1, (hg, p)).sum((3, 5)).permute(0, 1, 3, 2)
        dS = torch.empty_like(dE)
        dS[:, :, :-1] = dE[:, :, 1:]
        dS[:, :, -1] = 0  # the last chunk's state feeds no chunk
        # 2.
        d_scaled = (B2 @ dS).view(b, g, c, q, hg, p)
        dB2 = x_scaled.view(b, g, c, q, hg * p) @ dS.transpose(-1, -2)
        dxdt.addcmul_(d_scaled.permute(0, 1, 4, 2, 3, 5), to_end.unsqueeze(-1))
        d_to_end = (d_scaled * xdt.permute(0, 1, 3, 4, 2, 5)).sum(-1).permute(0, 1, 4, 2, 3)
        # xdt = dt x and the skip, back in [s, b, h, p]
        s = x.shape[0]
        dxdt_of_x = dxdt.view(b, g, hg, c * q, p)[:, :, :, :s].permute(3, 0, 1, 2, 4)  # [s, b, g, h/g, p]
        dx, products = x.new_empty(x.shape), x.new_empty(x.shape)  # products: x dxdt, then x dy
        torch.mul(dxdt_of_x, dt.unflatten(-1, (g, hg)).unsqueeze(-1), out=dx.unflatten(2, (g, hg)))
        torch.mul(dxdt_of_x, x.unflatten(2, (g, hg)), out=products.unflatten(2, (g, hg)))
        ddt = products.sum(-1).to(dt.dtype)
        dD = None
        if D is not None:
            dy_of_x = dy.reshape(c * q, *x.shape[1:])[:s]
            dx.addcmul_(dy_of_x, D.unsqueeze(-1))
            dD = torch.mul(dy_of_x, x, out=products).sum((0, 1, 3)).to(D.dtype)
        return (dx, ddt, dD, dB + dB2.unsqueeze(2), dC + dC2.unsqueeze(2), dcum, None, d_to_end, d_from_start,
                d_whole)


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int,
        reset: torch.Tensor | None = None, D: torch.Tensor | None = None) -> torch.Tensor:
    """``mamba2.ssd`` without context parallelism (same arguments, ``x [s, b, h, p]`` -> ``y [s, b, h, p]``, with the
    skip ``D x`` where ``D`` is given)."""
    s, b, h, p = x.shape
    log_a, B, C = mamba2.chunked_decays_and_state_vectors(dt, A, B, C, chunk_size, reset)
    cum, document = mamba2.cumulative_log_decay(log_a)
    y = _ChunkedSSD.apply(x, dt, D, B.unsqueeze(2), C.unsqueeze(2), cum, document, *mamba2.boundary_decays(log_a))
    y = y.view(-1, b, h, p)
    return y[:s] if y.shape[0] > s else y  # a slice's backward is a zero fill and a copy, even of the whole
