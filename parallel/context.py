"""Context parallelism: one sequence split over the ranks of a context-parallel group.

Rank ``c`` of ``C`` holds positions ``[c L, (c + 1) L)`` of a sequence of ``S = C L`` tokens (contiguous
chunks, in order; no zig-zag reordering). Position-wise sublayers need nothing from other chunks; the
others need one of three things from the chunks before theirs (``chimera.models.spec.ContextParallel``),
and this module is how they get it:

* ``gather_sequence``: every rank's chunk of a tensor, in sequence order (global attention's keys and
  values); backward: each rank's gradient for every chunk, summed onto the chunk's owner.
* ``halo``: the ``n`` positions just before this rank's chunk (a sliding window's keys and values, a short
  convolution's inputs), sent by whichever earlier ranks hold them; zeros before the sequence start.
  Backward: the gradients go back to those ranks and are added to their inputs' gradients.
* ``state_entering``: the state a linear recurrence ``h_t = a_t h_{t-1} + b_t`` carries into this rank's
  chunk. Each rank scans its chunk from a zero state, giving ``(A_c, H_c)``: the product of its decays
  and its final state. The recurrence composes associatively, ``(A, H) . (A', H') = (A' A, A' H + H')``,
  so the state entering chunk ``c`` is the fold of the pairs of chunks ``0 .. c-1``; every rank gathers
  the pairs and folds the ones before its own. ``linear_scan_across`` then corrects each position:
  ``h_t = h_t^local + (prod_{s <= t} a_s) h_entering``.

Every function is the identity (or its single-rank equivalent) when ``dims.cp == 1``. All collectives run
on ``dims.cp_group``; with ``cp > 1`` and no group (a split emulated in one process) they raise.

Backward passes communicate too (a gather's backward is a reduce-scatter, a halo's sends gradients back),
so every rank must build the same autograd graph: a rank for which a collective's result does not matter
(the first rank needs no entering state) still uses it, times zero, so that it runs the backward
collective with the others, in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from chimera.parallel.dims import ParallelDims


def _group(dims: ParallelDims):
    if dims.cp_group is None:
        raise RuntimeError(f"context parallelism over {dims.cp} ranks needs the context-parallel process group")
    return dims.cp_group


def chunk_start(local_len: int, dims: ParallelDims) -> int:
    """The sequence position of this rank's first token (chunks are equal: ``local_len`` each)."""
    return dims.cp_rank * local_len


def local_chunk(t: torch.Tensor, dims: ParallelDims, dim: int) -> torch.Tensor:
    """This rank's chunk of a whole-sequence tensor, along ``dim``."""
    if dims.cp == 1:
        return t
    length = t.shape[dim]
    if length % dims.cp:
        raise ValueError(f"context parallelism over {dims.cp} ranks needs a sequence length divisible by it, "
                         f"got {length}")
    local = length // dims.cp
    return t.narrow(dim, dims.cp_rank * local, local)


# ---- keys and values of every chunk ------------------------------------------------------------------


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        mine = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        dist.reduce_scatter_tensor(mine, grad.contiguous(), group=ctx.group)  # sum over ranks of my chunk's rows
        return mine, None


def gather_sequence(x: torch.Tensor, dims: ParallelDims, dim: int = 0) -> torch.Tensor:
    """The whole sequence of ``x`` (this rank's chunk along ``dim``): every rank's chunk, in order."""
    if dims.cp == 1:
        return x
    return _GatherSequence.apply(x.movedim(dim, 0), _group(dims)).movedim(0, dim)


# ---- halos: the positions just before a chunk --------------------------------------------------------


def _halo_plan(n: int, local: int, dims: ParallelDims) -> tuple[list, list]:
    """Which rows this rank sends to later ranks and receives from earlier ones, for a halo of ``n``.

    Returns ``(sends, recvs)``: ``sends`` lists ``(peer, my_rows slice, their halo rows slice)``, ``recvs`` lists
    ``(peer, my halo rows slice, their rows slice)``; rows are chunk-local."""
    def overlap(receiver: int, owner: int):
        halo_lo, halo_hi = receiver * local - n, receiver * local  # global rows the receiver needs
        own_lo, own_hi = owner * local, (owner + 1) * local
        lo, hi = max(halo_lo, own_lo), min(halo_hi, own_hi)
        if lo >= hi:
            return None
        return slice(lo - own_lo, hi - own_lo), slice(lo - halo_lo, hi - halo_lo)

    me, sends, recvs = dims.cp_rank, [], []
    for later in range(me + 1, dims.cp):
        rows = overlap(later, me)
        if rows:
            sends.append((later, *rows))
    for earlier in range(me):
        rows = overlap(me, earlier)
        if rows:
            recvs.append((earlier, rows[1], rows[0]))
    return sends, recvs


def _exchange(send: list[tuple[int, torch.Tensor]], recv: list[tuple[int, torch.Tensor]], group) -> None:
    """Point-to-point sends and receives within ``group`` (peers given as group ranks), all at once."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(group, peer)) for peer, t in send]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, peer)) for peer, t in recv]
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()


class _Halo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n, dims):
        sends, recvs = _halo_plan(n, x.shape[0], dims)
        ctx.plan, ctx.group, ctx.local = (sends, recvs), _group(dims), x.shape[0]
        out = x.new_zeros((n, *x.shape[1:]))  # positions before the sequence start stay zero
        buffers = [(peer, x.new_empty((mine.stop - mine.start, *x.shape[1:])), mine) for peer, mine, _ in recvs]
        _exchange([(peer, x[rows]) for peer, rows, _ in sends], [(peer, buf) for peer, buf, _ in buffers], ctx.group)
        for _, buf, mine in buffers:
            out[mine] = buf
        return out

    @staticmethod
    def backward(ctx, grad):
        sends, recvs = ctx.plan
        grad_x = grad.new_zeros((ctx.local, *grad.shape[1:]))
        back = [(peer, grad.new_empty((rows.stop - rows.start, *grad.shape[1:])), rows) for peer, rows, _ in sends]
        _exchange([(peer, grad[mine]) for peer, mine, _ in recvs], [(peer, buf) for peer, buf, _ in back], ctx.group)
        for _, buf, rows in back:
            grad_x[rows] += buf
        return grad_x, None, None


def halo(x: torch.Tensor, n: int, dims: ParallelDims, dim: int = 0) -> torch.Tensor:
    """The ``n`` positions of the sequence just before this rank's chunk of ``x`` (chunk along ``dim``):
    ``[n, ...]`` along ``dim``, zeros where they would precede the sequence's start."""
    if dims.cp == 1 or n == 0:
        return x.new_zeros((*x.shape[:dim], n, *x.shape[dim + 1:]))
    return _Halo.apply(x.movedim(dim, 0), n, dims).movedim(0, dim)


# ---- linear recurrences ------------------------------------------------------------------------------


def state_entering(decay: torch.Tensor, final: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """The state entering this rank's chunk of ``h_t = a_t h_{t-1} + b_t``.

    ``decay``: ``prod_t a_t`` over this rank's chunk, ``final``: its last state scanned from zero (``decay``
    broadcasts against ``final``). Differentiable: the gradient reaches the earlier ranks' pairs."""
    pair = torch.stack(torch.broadcast_tensors(decay, final))  # [2, ...]
    if pair.is_complex():  # complex states (S5) travel as real pairs
        pairs = torch.view_as_complex(gather_sequence(torch.view_as_real(pair).unsqueeze(0), dims))
    else:
        pairs = gather_sequence(pair.unsqueeze(0), dims)  # [cp, 2, ...]
    h = torch.zeros_like(final)
    for c in range(dims.cp - 1):  # (A, H) . (A', H') = (A' A, A' H + H'), applied to the state
        # Chunks at or after this rank's leave h as it is; multiplying by 0 rather than skipping them keeps every
        # rank's autograd graph alike, so each runs the gather's backward collective, in the same order.
        before = float(c < dims.cp_rank)
        h = before * (pairs[c, 0] * h + pairs[c, 1]) + (1.0 - before) * h
    return h


def linear_scan_across(scan, a: torch.Tensor, b: torch.Tensor, dims: ParallelDims
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All states of ``h_t = a_t h_{t-1} + b_t`` (time along dim 0) for this rank's chunk of a sequence split over
    the context-parallel ranks, equal to the unsplit scan's; and the state entering the chunk (None at cp = 1).

    ``scan(a, b)``: the single-chunk scan from a zero state (``chimera.models.scan.linear_scan``)."""
    h = scan(a, b)
    if dims.cp == 1:
        return h, None
    running = torch.cumprod(a, dim=0)  # prod_{s <= t} a_s: how the entering state reaches position t
    entering = state_entering(running[-1], h[-1], dims)
    return h + running * entering, entering


def sum_over_context(t: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """The sum over the context-parallel ranks of ``t`` (no gradient: counts and other statistics)."""
    if dims.cp == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, group=_group(dims))
    return t


def gather_counts(t: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """``[cp, ...]``: every context-parallel rank's ``t`` (no gradient), in rank order."""
    if dims.cp == 1:
        return t.unsqueeze(0)
    out = t.new_empty((dims.cp * t.numel(),))
    dist.all_gather_into_tensor(out, t.detach().reshape(-1).contiguous(), group=_group(dims))
    return out.view(dims.cp, *t.shape)
