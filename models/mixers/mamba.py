"""Mamba-1: the selective state space model mixer (Gu & Dao, arXiv 2312.00752).

Block (Sec. 3.4, Fig. 3), with ``d_inner = expand * d_model``::

    x, z = W_x u, W_z u                              # in_proj: the SSM branch and the gate
    x    = SiLU(Conv1D_k(x))                         # depthwise causal conv of width k = d_conv
    y    = SSM(x)                                    # selective scan, below
    out  = W_out (y * SiLU(z))

Selective SSM (Algorithm 2; Sec. 2, Eqs. 1a-2b, 4), per channel ``d`` with state size ``N``::

    dt_t, B_t, C_t = split(W_xp x_t)                 # x_proj: [dt_rank | N | N]  (s_B, s_C, s_Delta)
    Delta_t = softplus(W_dt dt_t + b_dt)             # dt_proj, then tau_Delta = softplus
    A       = -exp(A_log)                            # [d_inner, N], S4D-real init A_log[d, n] = log(n + 1)
    A_bar_t = exp(Delta_t A)                         # zero-order hold on A                  (4)
    B_bar_t x_t = Delta_t B_t x_t                    # the simplified (Euler) B of the paper/kernels
    h_t = A_bar_t * h_{t-1} + B_bar_t x_t            # h: [d_inner, N]                       (2a)
    y_t = h_t C_t + D * x_t                          # D: skip connection                    (2b)

Jamba (Lieber et al., arXiv 2403.19887; ``dt_bc_norm``) normalises the selection inputs
before they are used, as HF's ``JambaMambaMixer`` does::

    dt_t, B_t, C_t = RMSNorm_dt(dt_t), RMSNorm_B(B_t), RMSNorm_C(C_t)    # right after x_proj's split

each an RMSNorm over its own features (``dt_rank``, ``N``, ``N``) with its own weight, in the
arithmetic of HF's ``JambaRMSNorm``: normalised in fp32, cast back to the input dtype, then scaled.
(fp64 stays fp64 here, for reference tests; HF would round it through fp32.)

Zamba (Glorioso et al., arXiv 2405.16712; ``heads`` > 1) splits ``d_inner`` into ``H`` heads of
``P = d_inner / H`` channels, each an independent Mamba with its own selection projections::

    dt_t^h, B_t^h, C_t^h = split(W_xp^h x_t^h)       # x_proj_weight [H, dt_rank + 2N, P]
    Delta_t^h = softplus(W_dt^h dt_t^h + b_dt^h)     # dt_proj: [H P, dt_rank], applied per head

and the recurrence above per channel, with its head's ``B``, ``C``. One head is Mamba-1 itself.

``b_dt`` is initialised to softplus^-1 of ``Delta ~ log-uniform[1e-3, 1e-1]`` and ``W_dt`` to
``U(-dt_rank^-0.5, dt_rank^-0.5)`` (Sec. 3.6 / the reference code); ``D`` to ones.
Parameter names follow HF transformers' ``MambaMixer`` except that its ``in_proj`` is split into
``in_proj_x`` / ``in_proj_z`` (HF's weight is their concatenation along dim 0) and its
``conv1d.weight [d_inner, 1, k]`` is ``conv1d.weight [d_inner, k]`` here.

Tensor parallelism splits ``d_inner``: ``in_proj_x``, ``in_proj_z``, the conv, ``dt_proj``'s output,
``A_log`` and ``D`` are split along it, ``out_proj`` is row parallel. ``x_proj`` reduces over
``d_inner`` to ``dt_rank + 2N`` features that every rank needs in full (B and C are shared by all
channels), so it is a row-parallel projection whose output is all-reduced; the result is then
consumed by rank-local channels only, so it re-enters the TP region (``enter_tensor_parallel``:
identity forward, all-reduce of the gradient backward). The scan itself is per channel: no
communication. Jamba's dt/B/C norm weights (``[dt_rank]``, ``[N]``, ``[N]``) are replicated: they act
on that full, re-entered output, whose gradient is partial per rank (each rank's channels consume
it), so their gradients are partial too and are declared ``partial_grad_over_tp`` (summed over TP).

With heads, TP splits them (TP divides ``H``): a rank's channels are whole heads, so each head's
``x_proj_weight`` lives on that rank (split along dim 0) and no communication is needed at all.

Reference: ``forward`` runs the whole sequence with a parallel scan (``chimera.models.scan``) over ``[s, b, d_inner,
N]`` in fp32 (``selective_scan``; with ``model.kernels=triton`` and no context parallelism, its fused kernel
``chimera.models.ops.selective_scan``, which never forms the ``[s, b, d_inner, N]`` tensors); ``step`` advances one
token with O(1) state (conv window + h), which ``prefill`` takes from the forward pass (the conv's last inputs, the
scan's last state).
Context parallelism carries that state between sequence chunks: the conv's inputs as a halo, ``h``
combined from the earlier chunks' (decay product, final state) pairs (``chimera.parallel.context``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from chimera.models.conv import CausalConv1d
from chimera.models.numerics import at_least_fp32
from chimera.models.ops import dispatch
from chimera.models.spec import Build, ContextParallel, SublayerConfig, SublayerSpec, divisibility
from chimera.parallel.context import linear_scan_across
from chimera.parallel.dims import SINGLE_PROCESS, ParallelDims
from chimera.parallel.layers import ColumnParallel, RowParallel, enter_tensor_parallel
from chimera.parallel.sharding import declare, normal, ones

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4  # Delta's initial range (Sec. 3.6), as in HF / mamba_ssm


class MambaConfig(SublayerConfig):
    """The ``model:`` fields of the Mamba-1 mixer (symbol ``m``)."""

    ssm_state: int = Field(16, ge=1, description="Mamba: state size N per channel (Mamba-2: per head)")
    ssm_expand: int = Field(2, ge=1, description="Mamba: inner width = ssm_expand x d_model")
    ssm_dt_rank: int | None = Field(None, ge=1, description="Mamba-1: rank of the dt projection (resolved: d/16)")
    ssm_heads: int = Field(
        1, ge=1, description="Mamba-1: independent heads over d_inner / ssm_heads channels each, with their own "
        "x_proj and dt_proj (Zamba's n_mamba_heads)"
    )
    ssm_dt_bc_norm: bool = Field(
        False, description="Mamba-1: RMSNorm (eps norm_eps) on dt, B and C after x_proj, as in Jamba"
    )
    conv_kernel: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _resolve(self):
        self.ssm_dt_rank = self.ssm_dt_rank or math.ceil(self.d_model / 16)
        return self


def _a_log_init(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """S4D-real: ``A[d, n] = -(n + 1)``, stored as ``A_log = log(n + 1)`` for every channel."""
    return t.copy_(torch.log(torch.arange(1, t.shape[1] + 1, dtype=t.dtype)).expand_as(t))


def _dt_bias_init(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``softplus(bias) = Delta ~ log-uniform[DT_MIN, DT_MAX]``: bias = softplus^-1(Delta)."""
    dt = torch.exp(t.uniform_(math.log(DT_MIN), math.log(DT_MAX), generator=g)).clamp_(min=DT_FLOOR)
    return t.copy_(dt + torch.log(-torch.expm1(-dt)))


def _uniform(bound: float):
    return lambda t, g: t.uniform_(-bound, bound, generator=g)


class SelectionNorm(nn.Module):
    """RMSNorm of dt, B or C (Jamba), with HF ``JambaRMSNorm``'s arithmetic: ``w * (x / rms(x))``, the
    normalisation in fp32 (or wider), the result cast to ``x``'s dtype before the scale (applied in it).

    The weight ``[dim]`` is replicated on TP ranks; its gradient is partial there (see the module docstring).
    """

    def __init__(self, dim: int, eps: float, dims: ParallelDims):
        super().__init__()
        self.eps = eps
        self.weight = declare(nn.Parameter(torch.empty(dim)), init=ones, partial_grad_over_tp=dims.tp > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = at_least_fp32(x)
        y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return self.weight.to(x.dtype) * y


def discretise(dt: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor):
    """(4): ``A_bar = exp(Delta A)`` and ``B_bar x = Delta x B``, ``[..., H, P, N]``, from ``Delta, x [..., H, P]``,
    ``A [H, P, N]``, ``B [..., H, N]``."""
    return torch.exp(dt.unsqueeze(-1) * A), (dt * x).unsqueeze(-1) * B.unsqueeze(-2)


def read_out(h: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """(2b) without the skip: ``y = C . h`` over the state, ``h [..., H, P, N]``, ``C [..., H, N]`` -> ``[..., H,
    P]``."""
    return (h * C.unsqueeze(-2)).sum(-1)


def selective_scan(dt: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   reset: torch.Tensor | None = None, scan=None, dims: ParallelDims = SINGLE_PROCESS):
    """(2a), (2b), (4) over a sequence: ``Delta, x [s, b, H, P]``, ``A [H, P, N]``, ``B, C [s, b, H, N]``, ``reset
    [s, b]`` (a document's first token: ``A_bar = 0``) -> (``y = C . h [s, b, H, P]``, the last ``h [b, H, P, N]``).
    Every ``A_bar``, ``B_bar x`` and ``h`` is a ``[s, b, H, P, N]`` tensor, scanned by ``scan`` through
    ``linear_scan_across`` (under context parallelism from the earlier ranks' state); the fused kernel:
    ``chimera.models.ops.selective_scan``."""
    dA, dBx = discretise(dt, x, A, B)
    if reset is not None:
        dA = dA.masked_fill(reset[..., None, None, None], 0.0)
    h = linear_scan_across(scan or dispatch.scan_with("reference"), dA, dBx, dims)[0]
    return read_out(h, C), h[-1]


class MambaMixer(nn.Module):
    """Symbol ``m``: the Mamba-1 selective SSM mixer, ``[s, b, d_model] -> [s, b, d_model]``."""

    ROW_POSITIONS = True  # step takes each row's position (chimera.models.positions)

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", *, conv_bias: bool = True, bias: bool = False,
                 dt_bc_norm: bool = False, heads: int = 1, norm_eps: float = 1e-6, init_std: float, out_std: float,
                 dims: ParallelDims, kernels: str = "auto"):
        super().__init__()
        self.kernels = kernels
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        inner_local = dims.local(self.d_inner, "d_inner")
        if self.d_inner % heads:
            raise ValueError(f"ssm_heads={heads} does not divide d_inner={self.d_inner} (expand * d_model)")
        if heads > 1 and dt_bc_norm:
            raise ValueError("Mamba-1 with several heads and dt/B/C norms is not a published model; pick one")
        self.multi_head = heads > 1
        self.heads_local = dims.local(heads, "ssm_heads") if self.multi_head else 1
        self.head_dim = inner_local // self.heads_local

        # weight [d_inner / tp, d_model] (bias [d_inner / tp]) each: split along dim 0 (d_inner)
        self.in_proj_x = ColumnParallel(d_model, self.d_inner, dims, init=normal(init_std), bias=bias)
        self.in_proj_z = ColumnParallel(d_model, self.d_inner, dims, init=normal(init_std), bias=bias)
        # weight [d_inner / tp, d_conv], bias [d_inner / tp]: split along dim 0 (d_inner)
        self.conv1d = CausalConv1d(inner_local, d_conv, bias=conv_bias, dims=dims, kernels=kernels)
        if not self.multi_head:
            # [dt_rank + 2 N, d_inner / tp]: split along dim 1 (d_inner); output all-reduced over TP. The
            # input is this rank's full sequence (inside the mixer), so no sequence-parallel reduce-scatter.
            self.x_proj = RowParallel(self.d_inner, self.dt_rank + 2 * d_state, dims, init=normal(init_std),
                                      scatter_sequence=False)
        else:
            # [H / tp, dt_rank + 2 N, P]: split along dim 0 (heads); rank-local
            self.x_proj_weight = declare(nn.Parameter(torch.empty(self.heads_local, self.dt_rank + 2 * d_state,
                                                                  self.head_dim)), init=normal(init_std), split_dim=0)
        # weight [d_inner / tp, dt_rank], bias [d_inner / tp]: split along dim 0 (d_inner)
        self.dt_proj = ColumnParallel(self.dt_rank, self.d_inner, dims, init=_uniform(self.dt_rank**-0.5), bias=True,
                                      bias_init=_dt_bias_init)
        # [d_inner / tp, N] and [d_inner / tp]: split along dim 0 (d_inner); never weight-decayed
        self.A_log = declare(nn.Parameter(torch.empty(inner_local, d_state)), init=_a_log_init, split_dim=0,
                             weight_decay=False)
        self.D = declare(nn.Parameter(torch.empty(inner_local)), init=ones, split_dim=0, weight_decay=False)
        # Jamba: [dt_rank], [N], [N], replicated (gradient partial per TP rank, summed over TP)
        self.dt_bc_norm = dt_bc_norm
        if dt_bc_norm:
            self.dt_layernorm = SelectionNorm(self.dt_rank, norm_eps, dims)
            self.b_layernorm = SelectionNorm(d_state, norm_eps, dims)
            self.c_layernorm = SelectionNorm(d_state, norm_eps, dims)
        # [d_model, d_inner / tp]: split along dim 1 (d_inner); all-reduce / reduce-scatter of the output
        self.out_proj = RowParallel(self.d_inner, d_model, dims, init=normal(out_std), bias=bias)
        self.dims = dims

    def _selection(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [..., d_inner/tp] -> (Delta [..., H, P], B, C [..., H, 1, N])``, fp32 or wider: channels viewed as
        ``H`` heads of ``P`` (one head, ``P = d_inner/tp``, when every channel shares B and C)."""
        if not self.multi_head:
            x_dbl = enter_tensor_parallel(self.x_proj(x), self.dims, False)  # full on every rank; gradient summed
            dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
            if self.dt_bc_norm:  # Jamba; after the re-entry, so the gradient reaching the norm weights is partial
                dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
            dt = F.softplus(at_least_fp32(self.dt_proj(dt))).unsqueeze(-2)  # Delta, from here on fp32
            return dt, at_least_fp32(B)[..., None, None, :], at_least_fp32(C)[..., None, None, :]
        # heads: [..., H/tp, P] -> per head [..., H/tp, dt_rank + 2N]
        x_dbl = torch.einsum("...hp,hkp->...hk", x.unflatten(-1, (self.heads_local, self.head_dim)), self.x_proj_weight)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        w_dt = self.dt_proj.weight.unflatten(0, (self.heads_local, self.head_dim))  # [H/tp, P, dt_rank]
        b_dt = self.dt_proj.bias.unflatten(0, (self.heads_local, self.head_dim))
        dt = F.softplus(at_least_fp32(torch.einsum("...hr,hpr->...hp", dt, w_dt) + b_dt))
        return dt, at_least_fp32(B).unsqueeze(-2), at_least_fp32(C).unsqueeze(-2)

    def _ssm_inputs(self, x: torch.Tensor):
        """``(Delta, x [..., H, P], A [H, P, N], B, C [..., H, N])`` at every position of ``x [..., d_inner/tp]``, in
        fp32 or wider."""
        dt, B, C = self._selection(x)
        xf = at_least_fp32(x).unflatten(-1, dt.shape[-2:])
        A = -torch.exp(self.A_log.to(xf.dtype)).unflatten(0, dt.shape[-2:])  # [H, P, N]
        return dt, xf, A, B.squeeze(-2), C.squeeze(-2)

    def _output(self, y: torch.Tensor, xf: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = (y + self.D.to(xf.dtype).unflatten(0, xf.shape[-2:]) * xf).flatten(-2)  # (2b) with the D skip
        return self.out_proj(y.to(z.dtype) * F.silu(z))

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:  # [s, b, d] -> [s, b, d]
        """``docs``: packed documents (``chimera.models.documents``); state never crosses a boundary."""
        return self._mix(x, docs)[0]

    def _mix(self, x: torch.Tensor, docs=None):
        """(the block's output, the conv's inputs ``[s, b, d_inner/tp]``, the last state ``h [b, H, P, N]``)."""
        z = self.in_proj_z(x)
        xi = self.in_proj_x(x)
        xc = F.silu(self.conv1d(xi, docs))
        dt, xf, A, B, C = self._ssm_inputs(xc)
        reset = None if docs is None else docs.starts  # h_{t-1} dropped at a document's start
        y, h_last = dispatch.selective_scan(dt, xf, A, B, C, reset, dims=self.dims, kernels=self.kernels)
        return self._output(y, xf, z), xi, h_last

    def prefill(self, x: torch.Tensor, max_len: int):  # x: [s, b, d] -> (out, state)
        """The prompt in one pass; the state: the conv's last inputs and the scan's last ``h``."""
        out, xi, h_last = self._mix(x)
        return out, {"conv": self.conv1d.state_after(xi), "h": h_last.flatten(1, 2)}

    def init_state(self, batch: int, max_len: int):
        w = self.conv1d.weight
        return {
            "conv": self.conv1d.init_state(batch, device=w.device, dtype=w.dtype),
            "h": torch.zeros(batch, w.shape[0], self.d_state, device=w.device, dtype=at_least_fp32(w).dtype),
        }

    def step(self, x: torch.Tensor, state, pos: int) -> torch.Tensor:  # x: [1, b, d]
        z = self.in_proj_z(x)
        xc, state["conv"] = self.conv1d.step(self.in_proj_x(x)[0], state["conv"])
        dt, xf, A, B, C = self._ssm_inputs(F.silu(xc).unsqueeze(0))
        dA, dBx = discretise(dt[0], xf[0], A, B[0])  # [b, H, P, N]
        h = dA * state["h"].view_as(dA) + dBx
        state["h"] = h.flatten(1, 2)  # [b, d_inner/tp, N]
        return self._output(read_out(h, C[0]).unsqueeze(0), xf, z)


def build(c: MambaConfig, b: Build) -> MambaMixer:
    return MambaMixer(c.d_model, c.ssm_state, c.conv_kernel, c.ssm_expand, c.ssm_dt_rank, dt_bc_norm=c.ssm_dt_bc_norm,
                      heads=c.ssm_heads, norm_eps=c.norm_eps, init_std=b.init_std, out_std=b.out_std, dims=b.dims,
                      kernels=c.kernels)


def check_tensor_parallel(c: MambaConfig, tp: int) -> str | None:
    """``d_inner`` splits over ranks; with several heads, whole heads."""
    inner = c.ssm_expand * c.d_model
    if inner % tp:
        return f"parallel.tensor={tp} does not divide the Mamba inner width model.ssm_expand x model.d_model = {inner}"
    if c.ssm_heads > 1:
        return divisibility(tp, {"model.ssm_heads": c.ssm_heads}, "Mamba heads stay whole")
    return None


def flops_per_token(c: MambaConfig, seq_len: int) -> dict[str, float]:
    """``in_proj`` (x and z), ``x_proj`` (to ``dt_rank + 2N``), ``dt_proj`` and ``out_proj``, 2 per weight (with
    heads: each head's ``x_proj``/``dt_proj`` over its ``P`` channels, the same total); the conv's taps; the
    selective scan per state element of ``[d_inner, N]``: ``h = A_bar h + B_bar x`` (2) and ``y = C . h`` (2). The
    discretisation ``exp(Delta A)``, ``Delta B x`` is pointwise (not counted)."""
    d, inner, n, rank = c.d_model, c.ssm_expand * c.d_model, c.ssm_state, c.ssm_dt_rank
    return {"projections": 2.0 * (2 * d * inner + inner * (rank + 2 * n) + rank * inner + inner * d),
            "conv": 2.0 * c.conv_kernel * inner, "scan": 2.0 * inner * n, "read-out": 2.0 * inner * n}


SPECS = (SublayerSpec("m", "Mamba selective SSM (Mamba-1)", MambaConfig, build, check_tensor_parallel,
                      lambda c: ContextParallel("state"), flops_per_token=flops_per_token),)
