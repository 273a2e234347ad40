"""The RG-LRU on CPU: the reference's gates and recurrence (``chimera.models.mixers.rglru.states``) as one function
with its backward written out.

Autograd through the reference keeps a tensor for every elementwise step of Eqs. (1)-(3) and makes as many in its
backward; on a CPU each is a fresh ``[s, b, w]`` buffer to fault in and a pass over memory, which costs more than the
arithmetic. Here the forward builds ``a_t`` and ``b_t`` in place, scans, and keeps only ``r, i, u, a_t, m_t, h``;
the backward is the chain rule by hand, with ``m_t = sqrt(1 - a_t^2)``, ``lambda = dL/db`` (the scan's adjoint,
``chimera.models.scan``) and ``rho`` a document's first token (``a_t = 0`` there)::

    h_t      = a_t h_{t-1} + m_t i_t u_t             dL/da_t = lambda_t h_{t-1}   (0 at rho)
    log a_t  = -c r_t softplus(-Lambda)              dL/dm_t = lambda_t i_t u_t
                                                     dL/du_t = lambda_t m_t i_t,   dL/di_t = lambda_t m_t u_t
    dm_t / dlog a_t = -a_t^2 / m_t = m_t - 1 / m_t   dL/dlog a_t = a_t dL/da_t + (m_t - 1 / m_t) dL/dm_t
    dL/dz_r = dL/dlog a_t (-c softplus(-Lambda)) r_t (1 - r_t),   dL/dz_i = dL/di_t i_t (1 - i_t)
    dL/dLambda = c sigma(-Lambda) sum_t dL/dlog a_t r_t

(``z_r``, ``z_i`` the gates' pre-activations, the function's inputs.) ``a_t^2 = 1 - m_t^2`` lets the backward do
without ``a_t`` where the reset masked it; where RecurrentGemma's reset sets ``m_t = 1``, ``m_t - 1 / m_t = 0`` passes
nothing back through it, as the reference's ``where`` does. Without context parallelism only: there the state
crosses ranks (``chimera.parallel.context``), which the reference does.
"""

from __future__ import annotations

import torch

from chimera.models import scan
from chimera.models.mixers.rglru import GATE_C, log_decay_rate


class _GatedRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_a, gate_x, u, a_param, reset, reset_unnormalized):
        at_reset = reset.nonzero(as_tuple=True)  # a few positions: indexing them beats a masked pass over [s, b, w]
        r, i = torch.sigmoid(gate_a), torch.sigmoid(gate_x)  # (1), (2)
        a = torch.mul(r, log_decay_rate(a_param, u.dtype))  # log a_t (3)
        m = torch.mul(a, 2.0).expm1_().neg_().sqrt_()  # sqrt(1 - a_t^2), accurate near a_t = 1
        a.exp_()[at_reset] = 0.0
        if reset_unnormalized:
            m[at_reset] = 1.0
        h = scan.algorithm(u.device, u.shape).states(a, torch.mul(m, i).mul_(u))  # (4)
        ctx.save_for_backward(r, i, u, a_param, a, m, h)
        return h

    @staticmethod
    def backward(ctx, g):
        r, i, u, a_param, a, m, h = ctx.saved_tensors
        lam = scan.algorithm(u.device, g.shape).adjoint(a, g.contiguous())  # dL/db
        dlog_a = torch.empty_like(h)
        dlog_a[0].zero_()
        torch.mul(lam[1:], h[:-1], out=dlog_a[1:])  # dL/da_t
        dlog_a.mul_(a)  # through a_t; nothing at a reset, where a_t = 0
        du = torch.mul(lam, m)
        dgate_x = torch.mul(du, u)  # dL/di
        du.mul_(i)
        dgate_x = torch.ops.aten.sigmoid_backward(dgate_x, i)
        dm = lam.mul_(i).mul_(u)  # where a reset set m_t = 1, m_t - 1 / m_t = 0: nothing passes
        dlog_a.sub_(dm.mul_(torch.reciprocal(m).sub_(m)))  # + (m - 1 / m) dL/dm
        sum_r = torch.mul(dlog_a, r, out=dm).sum((0, 1))
        dlog_a.mul_(log_decay_rate(a_param, u.dtype))
        dgate_a = torch.ops.aten.sigmoid_backward(dlog_a, r)
        da_param = (GATE_C * torch.sigmoid(-a_param.to(u.dtype)) * sum_r).to(a_param.dtype)
        return dgate_a, dgate_x, du, da_param, None, None


def states(gate_a: torch.Tensor, gate_x: torch.Tensor, u: torch.Tensor, a_param: torch.Tensor, reset: torch.Tensor,
           reset_unnormalized: bool) -> torch.Tensor:
    """``chimera.models.mixers.rglru.states`` at cp = 1: every ``h_t [s, b, w]`` from the gates' pre-activations
    ``gate_a, gate_x [s, b, w]``, ``u [s, b, w]`` (fp32 or wider), ``Lambda = a_param [w]``, ``reset [s, b]``."""
    return _GatedRecurrence.apply(gate_a, gate_x, u, a_param, reset, reset_unnormalized)
