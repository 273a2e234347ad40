"""The first-order linear recurrence ``h_t = a_t * h_{t-1} + b_t``, along dim 0 (time).

Used by every diagonal linear recurrence (RG-LRU, Mamba-1, Mamba-2 between chunks). Two forward
algorithms compute the same states:

* ``HillisSteele``: ``ceil(log2 T)`` rounds of whole-tensor ops, each combining position ``t``
  with ``t - k`` under the associative operator ``(a_1, b_1) . (a_2, b_2) = (a_1 a_2, a_2 b_1 + b_2)``;
  few, large ops (the right shape for an accelerator), ``O(T log T)`` work.
* ``Sequential``: one in-place multiply-add per time step, ``O(T)`` work; on a CPU, where an op on a
  ``[b, d, N]`` slice is cheap to launch, this does ``log2 T`` times less work and wins.

Both only multiply decays (|a| <= 1), so they are stable for any length, unlike a cumulative-log
formulation. ``linear_scan`` runs one of them without recording an autograd graph and differentiates
through the adjoint recurrence, itself a linear scan run backwards in time::

    lambda_t = g_t + a_{t+1} lambda_{t+1}          (g = dL/dh, lambda = dL/db)
    dL/da_t  = lambda_t h_{t-1},   dL/dh0 = a_0 lambda_0

so the backward pass stores ``a`` and ``h`` only, instead of every round's intermediates.
"""

from __future__ import annotations

import math

import torch


def hillis_steele(a: torch.Tensor, b: torch.Tensor, mul=torch.mul) -> torch.Tensor:
    """All states of ``h_t = a_t h_{t-1} + b_t``, ``h_{-1} = 0``, in ``ceil(log2 T)`` rounds: round ``k`` combines
    position ``t`` with ``t - k``. ``mul``: the product (``chimera.models.complex_pairs.mul`` for complex numbers held
    as real pairs)."""
    b = b.expand(torch.broadcast_shapes(a.shape, b.shape))
    T, k = a.shape[0], 1
    while k < T:
        b = torch.cat([b[:k], b[k:] + mul(a[k:], b[:-k])])
        a = torch.cat([a[:k], mul(a[k:], a[:-k])])
        k *= 2
    return b


def adjoint_by_reversal(states, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``lambda_t = g_t + a_{t+1} lambda_{t+1}``: the forward scan ``states`` on time-reversed inputs."""
    a_next = torch.cat([a[1:], torch.zeros_like(a[:1])])
    return states(a_next.flip(0), g.flip(0)).flip(0)


class HillisSteele:
    @staticmethod
    def states(a: torch.Tensor, b: torch.Tensor, mul=torch.mul) -> torch.Tensor:
        """All states of ``h_t = a_t h_{t-1} + b_t``, ``h_{-1} = 0``: the parallel (log-depth) form."""
        return hillis_steele(a, b, mul)

    @staticmethod
    def adjoint(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return adjoint_by_reversal(HillisSteele.states, a, g)


class Sequential:
    @staticmethod
    def states(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """All states of ``h_t = a_t h_{t-1} + b_t``, ``h_{-1} = 0``: one fused multiply-add per step."""
        h = b.expand(torch.broadcast_shapes(a.shape, b.shape)).clone()
        h_t, a_t = h.unbind(0), a.unbind(0)  # each step's views at once (indexing per step costs more than its op)
        for t in range(1, h.shape[0]):
            h_t[t].addcmul_(a_t[t], h_t[t - 1])
        return h

    @staticmethod
    def adjoint(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``lambda_t = g_t + a_{t+1} lambda_{t+1}``, from the last step back."""
        lam = g.clone()
        lam_t, a_t = lam.unbind(0), a.unbind(0)
        for t in range(lam.shape[0] - 2, -1, -1):
            lam_t[t].addcmul_(a_t[t + 1], lam_t[t + 1])
        return lam


class TwoLevel:
    """``Sequential`` in ``n`` chunks of ``q ~ sqrt(T)`` steps: every chunk's scan from a zero state at once (``q``
    steps, each on a slice of all ``n`` chunks), then the chunk-end states carried across chunks (``n`` steps), then
    each state's share of the state entering its chunk added, ``h_t = h_local_t + (prod of a in the chunk up to t)
    h_entering``: ``2 sqrt(T)`` steps instead of ``T``, for about twice the memory traffic. The CPU form for long
    sequences of few rows (``batch x seq`` = ``1 x 16k``), where ``Sequential``'s per-step cost is the op's launch,
    not its arithmetic."""

    @staticmethod
    def states(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(a.shape, b.shape)
        T = shape[0]
        q = 2 ** max(0, round(math.log2(T) / 2))
        n = -(-T // q)
        h = b.expand(shape).clone()
        if n * q > T:  # padding at the end: it only reaches later (dropped) states
            h, a = (torch.cat([t, t.new_zeros(n * q - T, *t.shape[1:])]) for t in (h, a))
        h, a = h.unflatten(0, (n, q)), a.unflatten(0, (n, q))  # [n, q, ...]: chunk, step in it
        for t in range(1, q):  # every chunk's states from a zero state
            h[:, t].addcmul_(a[:, t], h[:, t - 1])
        decay = a.cumprod(1)  # prod of the chunk's a up to each step (|a| <= 1: no overflow)
        for j in range(1, n):  # the true state at each chunk's end
            h[j, -1].addcmul_(decay[j, -1], h[j - 1, -1])
        h[1:, :-1].addcmul_(decay[1:, :-1], h[:-1, -1:])  # the state entering each chunk, carried to its steps
        return h.flatten(0, 1)[:T]

    @staticmethod
    def adjoint(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return adjoint_by_reversal(TwoLevel.states, a, g)


TWO_LEVEL_BELOW = 2048  # slice elements: under this TwoLevel wins on this CPU (benchmarks/RESULTS.md, the scan)
TWO_LEVEL_FROM = 256  # steps: shorter scans are cheap either way


def algorithm(device: torch.device, shape: torch.Size | None = None):
    """The forward algorithm for tensors on ``device`` whose states have ``shape`` (``[T, ...]``, where known): on a
    CPU ``Sequential``, or ``TwoLevel`` for a long sequence whose steps each touch few elements; elsewhere
    ``HillisSteele``."""
    if device.type != "cpu":
        return HillisSteele
    if shape is not None and shape[0] >= TWO_LEVEL_FROM and shape[1:].numel() < TWO_LEVEL_BELOW:
        return TwoLevel
    return Sequential


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient to ``shape`` (sum over the dims that were expanded)."""
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape, strict=True)) if s == 1 and g != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0):
        ctx.b_shape = b.shape
        if h0 is not None:  # h_0 = a_0 h0 + b_0
            b = b.expand(torch.broadcast_shapes(a.shape, b.shape, (1, *h0.shape)))
            b = torch.cat([b[:1] + a[:1] * h0, b[1:]])
        h = algorithm(a.device, torch.broadcast_shapes(a.shape, b.shape)).states(a, b)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, g):
        a, h, h0 = ctx.saved_tensors
        lam = algorithm(a.device, g.shape).adjoint(a, g.contiguous())
        h_prev = torch.cat([(torch.zeros_like(h[:1]) if h0 is None else h0.unsqueeze(0).expand_as(h[:1])), h[:-1]])
        grad_a = _sum_to(lam * h_prev, a.shape) if ctx.needs_input_grad[0] else None
        grad_b = _sum_to(lam, ctx.b_shape) if ctx.needs_input_grad[1] else None
        grad_h0 = _sum_to(a[0] * lam[0], h0.shape) if h0 is not None and ctx.needs_input_grad[2] else None
        return grad_a, grad_b, grad_h0


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """All states ``h_0..h_{T-1}`` of ``h_t = a_t h_{t-1} + b_t`` along dim 0; ``h_{-1} = h0`` (or 0).

    ``a`` and ``b`` have the same number of dims and broadcast against each other (a decay shared
    by channels may have size 1 there)."""
    return _LinearScan.apply(a, b, h0)


def log_decay_after(log_a: torch.Tensor) -> torch.Tensor:
    """``sum_{k > t} log a_k`` along dim 0 (time): the log of the decay that what enters the state at ``t`` sees
    by the end, so that the last state is ``h_T = sum_t exp(log_decay_after(log a))_t b_t``. A sum of the later
    terms alone (a reversed cumulative sum, shifted), with no cancellation against the earlier ones."""
    return torch.cat([log_a.flip(0).cumsum(0).flip(0)[1:], torch.zeros_like(log_a[:1])])


def linear_recurrence_loop(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """The same recurrence one step at a time with autograd recording every step: the oracle the scan is
    tested against."""
    h = torch.zeros_like(b[0]) if h0 is None else h0
    out = []
    for t in range(a.shape[0]):
        h = a[t] * h + b[t]
        out.append(h)
    return torch.stack(out)
