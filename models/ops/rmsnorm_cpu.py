"""RMSNorm on CPU, plain or gated (Mamba-2's ``w * RMSNorm(x * SiLU(z))``): the references' math
(``chimera.models.norms.rms_norm``, ``chimera.models.mixers.mamba2.Mamba2Mixer._gated_norm``) with the backward
written out.

Over each group of ``n`` channels (one group: the plain norm), with ``g`` the normalised input (``x``, or
``x * SiLU(z)`` gated), ``r = 1 / sqrt(mean(g^2) + eps)``, ``xhat = g r`` and the scale ``w`` (``1 + w`` with
``offset``)::

    y = xhat * w                 dL/dw = sum_rows dL/dy * xhat
                                 dL/dg = r (dL/dy w - xhat mean_group(dL/dy w xhat))
    g = x * SiLU(z)              dL/dx = dL/dg SiLU(z),  dL/dz = dL/dg x (sigma(z) + SiLU(z) (1 - sigma(z)))

Autograd through the references keeps ``g^2``, its mean, the unscaled product and their gradients, each a fresh
buffer to fault in and a pass over memory; here the forward keeps ``xhat`` and ``r`` (and ``x``, ``sigma(z)``,
``SiLU(z)`` gated), and the backward makes two passes' buffers. In fp32 (or wider), whatever ``x``'s dtype, and
returned in it, as the references do.
"""

from __future__ import annotations

import torch

from chimera.models.numerics import at_least_fp32


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, weight, eps, groups, offset, out_dtype):
        x32 = at_least_fp32(x)
        sigma = None if gate is None else torch.sigmoid(at_least_fp32(gate))
        silu = None if gate is None else sigma * at_least_fp32(gate)
        g = x32 if gate is None else x32 * silu
        g = g.unflatten(-1, (groups, -1))  # [..., groups, n]
        r = torch.linalg.vector_norm(g, dim=-1, keepdim=True).square_().div_(g.shape[-1]).add_(eps).rsqrt_()
        xhat = g * r if gate is None else g.mul_(r)  # gated, g is this function's own buffer
        scale = weight.to(x32.dtype)
        scale = 1.0 + scale if offset else scale
        ctx.save_for_backward(xhat, r, scale, None if gate is None else x32, sigma, silu)
        ctx.dtypes = x.dtype, None if gate is None else gate.dtype, weight.dtype
        return (xhat.flatten(-2) * scale).to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        xhat, r, scale, x32, sigma, silu = ctx.saved_tensors
        x_dtype, gate_dtype, weight_dtype = ctx.dtypes
        dy = dy.to(xhat.dtype)
        dy_xhat = dy * xhat.flatten(-2)
        dweight = dy_xhat.sum(tuple(range(dy.dim() - 1))).to(weight_dtype)
        mean_dot = dy_xhat.mul_(scale).unflatten(-1, xhat.shape[-2:]).mean(-1, keepdim=True)  # per group
        dg = (dy * scale).unflatten(-1, xhat.shape[-2:]).addcmul_(xhat, mean_dot, value=-1.0).mul_(r).flatten(-2)
        if sigma is None:
            return dg.to(x_dtype), None, dweight, None, None, None, None
        dx = (dg * silu).to(x_dtype)
        dsilu = torch.sub(1.0, sigma).mul_(silu).add_(sigma)  # SiLU'(z) = sigma(z) + SiLU(z) (1 - sigma(z))
        return dx, dg.mul_(x32).mul_(dsilu).to(gate_dtype), dweight, None, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool = False, *,
             gate: torch.Tensor | None = None, groups: int = 1, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``chimera.models.norms.rms_norm`` over the last dim (``gate``: of ``x * SiLU(gate)``, Mamba-2's; ``groups``:
    normalised in that many equal groups of channels), in ``dtype`` (default: ``x``'s)."""
    return _RMSNorm.apply(x, gate, weight, eps, groups, offset, dtype or x.dtype)
