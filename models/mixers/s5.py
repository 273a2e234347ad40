"""S5: the simplified state space layer (Smith, Warrington & Linderman, arXiv 2208.04933).

One multi-input multi-output linear SSM over all ``H = d_model`` channels, with ``P`` complex states and a
diagonal state matrix (Sec. 3)::

    x'(t) = A x(t) + B u(t),   y(t) = C x(t) + D u(t)           # A [P, P], B [P, H], C [H, P], D [H] (diagonal)
    A = V Lambda V^-1                                          # diagonalised: the state is x~ = V^-1 x

Initialisation (Sec. 4.3, App. B.1): ``A`` is HiPPO-N, the normal part of HiPPO-LegS (``A_LegS + p p^T``,
``p_n = sqrt(n + 1/2)``), in closed form::

    (A_N)_nk = -sqrt(n + 1/2) sqrt(k + 1/2)   n > k
               -1/2                           n = k
               +sqrt(n + 1/2) sqrt(k + 1/2)   n < k

i.e. ``-1/2 I`` plus a real skew-symmetric matrix ``S``: its eigenvalues are ``Lambda = -1/2 + i mu`` with ``i mu``
those of ``S`` (``-i S = V diag(mu) V^H``, a Hermitian eigenproblem; ``V`` unitary, so ``V^-1 = V^H``).
``B~ = V^-1 B`` with ``B`` lecun-normal, ``C~ = C V`` with ``C`` complex normal of variance ``1 / P``, ``D ~ N(0, 1)``,
a step per state ``Delta = exp(log_step)``, ``log_step ~ U[log dt_min, log dt_max]``.

Conjugate symmetry (Sec. 4.4 / App. C): ``A_N`` is real, so its eigenvalues and eigenvectors come in conjugate
pairs; with a real input the states of a pair are conjugate too, and only one of each pair is stored
(``P / 2``), the output being ``y = 2 Re(C~ x~) + D u``. ``s5_conj_sym: false`` stores all ``P`` states,
``y = Re(C~ x~) + D u`` (s5-pytorch's form). Complex parameters are stored as real pairs (``[..., 2]``):
``Lambda`` as ``lambda_re``, ``lambda_im``; ``B~ [P, H, 2]``, ``C~ [H, P, 2]``.

Zero-order hold (Sec. 2.2, Eq. 6), per state::

    Lambda_bar = exp(Lambda Delta),   B_bar = (Lambda_bar - 1) / Lambda * B~

Discrete recurrence (Eq. 2-3) and the layer's output (Sec. 3; the nonlinearity is GELU, S5's ``gelu`` option)::

    x_t = Lambda_bar * x_{t-1} + B_bar u_t,   y_t = 2 Re(C~ x_t) + D u_t,   out_t = GELU(y_t)

Reference: ``forward`` computes every ``x_t`` with the parallel (associative) scan of the operator
``(a, b) . (a', b') = (a' a, a' b + b')`` over the elements ``(Lambda_bar, B_bar u_t)``, log-depth in whole-tensor
ops (``chimera.models.scan.HillisSteele``, differentiated by autograd); ``step`` is the O(1) recurrence itself, one
token at a time (the complex state ``[b, P/2]``). Causal only (S5's bidirectional form is not built).

Every complex number (parameters, ``Lambda_bar``, ``B_bar``, the states) is a real pair ``[..., 2]``
(``chimera.models.complex_pairs``), so the ONNX graphs (no complex element type) trace the training code. Only the
scan itself crosses to torch complex tensors, for its Triton kernel and the context-parallel fold; in a graph traced
for export it runs on the pairs, with complex products.

Tensor parallelism splits the states: ``Lambda``, ``log_step`` and ``B~`` by rows (state), ``C~`` by columns
(state); each rank's ``2 Re(C~ x)`` is a partial sum over its states, all-reduced (or reduce-scattered under
sequence parallelism) like a row-parallel layer, once per layer, before the GELU. ``D`` is replicated; each rank
adds ``D u / tp`` before the reduction, so its gradient is partial per rank (summed over TP). The scan is per state
and needs no communication.

Context parallelism (rule ``state``): the scan's state entering a rank's chunk is folded from the earlier chunks'
(decay product, final state) pairs, complex (``chimera.parallel.context.linear_scan_across``).

Packed documents: ``Lambda_bar`` is replaced by 0 at a document's first token, so no state crosses a boundary.

Training specifics (S5's reference training, ``ssm_lr``): ``Lambda``, ``log_step`` and ``B~`` learn at
``s5_lr_scale`` times the run's learning rate, without weight decay (declared at the parameters). ``metrics()``
reports the discrete eigenvalues' stability: ``max |Lambda_bar|`` and the fraction of states with
``|Lambda_bar| > 1 - s5_monitor_eps`` (all of the layer's states, over TP ranks).
"""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from chimera.models import complex_pairs as cx
from chimera.models.numerics import at_least_fp32
from chimera.models.ops import dispatch
from chimera.models.positions import at_start
from chimera.models.scan import HillisSteele
from chimera.models.spec import Build, ContextParallel, SublayerConfig, SublayerSpec, divisibility
from chimera.parallel.context import linear_scan_across
from chimera.parallel.dims import ParallelDims
from chimera.parallel.layers import leave_tensor_parallel
from chimera.parallel.sharding import declare, normal


class S5Config(SublayerConfig):
    """The ``model:`` fields of the S5 layer (symbol ``S``)."""

    s5_state: int = Field(64, ge=1, description="S5: state size P (complex states; P / 2 stored with s5_conj_sym)")
    s5_conj_sym: bool = Field(True, description="S5: store one state of each conjugate pair (P / 2), output "
                              "2 Re(C x); false: all P states, Re(C x)")
    s5_dt_min: float = Field(0.001, gt=0, description="S5: smallest initial step Delta")
    s5_dt_max: float = Field(0.1, gt=0, description="S5: largest initial step Delta")
    s5_lr_scale: float = Field(0.1, gt=0, description="S5: learning-rate scale of Lambda, log_step and B")
    s5_monitor_eps: float = Field(1e-3, gt=0, lt=1, description="S5: the monitor counts states with "
                                  "|Lambda_bar| > 1 - s5_monitor_eps")

    @model_validator(mode="after")
    def _check(self):
        if self.s5_conj_sym and self.s5_state % 2:
            raise ValueError(f"s5_state={self.s5_state} must be even with s5_conj_sym (states in conjugate pairs); "
                             "choose an even size or set s5_conj_sym: false")
        if self.s5_dt_min > self.s5_dt_max:
            raise ValueError(f"s5_dt_min={self.s5_dt_min} exceeds s5_dt_max={self.s5_dt_max}; swap them")
        return self

    @property
    def stored_states(self) -> int:
        return self.s5_state // 2 if self.s5_conj_sym else self.s5_state


def hippo_n(P: int) -> torch.Tensor:
    """HiPPO-N ``[P, P]`` (fp64): ``-1/2 I`` plus the skew-symmetric part, from the closed form above."""
    p = torch.sqrt(torch.arange(P, dtype=torch.float64) + 0.5)
    outer = p[:, None] * p[None, :]
    return outer.triu(1) - outer.tril(-1) - 0.5 * torch.eye(P, dtype=torch.float64)


@cache
def hippo_n_eigen(P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Lambda [P], V [P, P])``, complex128, ``A_N = V diag(Lambda) V^H``, ascending imaginary parts: the first
    ``P / 2`` (negative imaginary parts) have their conjugates in the second half."""
    skew = hippo_n(P) + 0.5 * torch.eye(P, dtype=torch.float64)
    mu, V = torch.linalg.eigh(-1j * skew.to(torch.complex128))  # -i S Hermitian: S = V (i mu) V^H
    return torch.complex(torch.full_like(mu, -0.5), mu), V


def _kept(P: int, stored: int) -> tuple[torch.Tensor, torch.Tensor]:
    Lambda, V = hippo_n_eigen(P)
    return Lambda[:stored], V[:, :stored]


def _pairs(z: torch.Tensor) -> torch.Tensor:
    return torch.stack([z.real, z.imag], dim=-1)


def _init_lambda_im(P: int):
    return lambda t, g: t.copy_(_kept(P, t.shape[0])[0].imag)


def _init_log_step(dt_min: float, dt_max: float):
    return lambda t, g: t.uniform_(math.log(dt_min), math.log(dt_max), generator=g)


def _init_b(P: int):
    """``B~ = V^-1 B = V^H B``, ``B [P, H]`` lecun normal (std ``1 / sqrt(H)``): ``[P', H, 2]``."""
    def init(t, g):
        stored, H = t.shape[:2]
        B = torch.randn(P, H, generator=g, dtype=torch.float64) / math.sqrt(H)
        return t.copy_(_pairs(_kept(P, stored)[1].conj().T @ B.to(torch.complex128)))
    return init


def _init_c(P: int):
    """``C~ = C V``, ``C [H, P]`` complex with real and imaginary parts ``N(0, 1 / P)``: ``[H, P', 2]``."""
    def init(t, g):
        H, stored = t.shape[:2]
        C = torch.randn(H, P, 2, generator=g, dtype=torch.float64) / math.sqrt(P)
        return t.copy_(_pairs(torch.complex(C[..., 0], C[..., 1]) @ _kept(P, stored)[1]))
    return init


def zoh(Lambda: torch.Tensor, B: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order hold of the diagonal system: ``Lambda_bar = exp(Lambda Delta)``, ``B_bar = (Lambda_bar - 1) /
    Lambda * B~`` (``Lambda [P, 2]``, ``B [P, H, 2]`` complex pairs, ``step [P]`` real)."""
    Lambda_bar = cx.exp(Lambda * step.unsqueeze(-1))
    return Lambda_bar, cx.mul(cx.div(Lambda_bar - cx.real(torch.ones_like(step)), Lambda).unsqueeze(-2), B)


def associative_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All ``x_t = a_t x_{t-1} + b_t`` (time along dim 0, ``x_{-1} = 0``, complex pairs ``[..., 2]``): the parallel
    scan, log-depth, its products complex."""
    return HillisSteele.states(a, b, mul=cx.mul)


class S5SSM(nn.Module):
    """The diagonal MIMO SSM over this rank's states: ``u [s, b, H]`` -> this rank's part of ``y`` (before the sum
    over TP ranks)."""

    def __init__(self, d_model: int, state: int, *, conj_sym: bool = True, dt_min: float = 0.001,
                 dt_max: float = 0.1, lr_scale: float = 1.0, dims: ParallelDims, kernels: str = "auto"):
        super().__init__()
        self.dims, self.conj_sym, self.kernels = dims, conj_sym, kernels
        stored = state // 2 if conj_sym else state
        local = dims.local(stored, "the S5 stored states (s5_state, halved with s5_conj_sym)")

        def ssm_param(shape, init):  # [P' / tp, ...]: split along dim 0 (states); S5's ssm group
            return declare(nn.Parameter(torch.empty(shape)), init=init, split_dim=0, weight_decay=False,
                           lr_scale=lr_scale)

        self.lambda_re = ssm_param((local,), lambda t, g: t.fill_(-0.5))
        self.lambda_im = ssm_param((local,), _init_lambda_im(state))
        self.log_step = ssm_param((local,), _init_log_step(dt_min, dt_max))
        self.B = ssm_param((local, d_model, 2), _init_b(state))
        # C~ [H, P' / tp, 2]: split along dim 1 (states); this rank's readout is a partial sum over states
        self.C = declare(nn.Parameter(torch.empty(d_model, local, 2)), init=_init_c(state), split_dim=1)
        # D [H]: replicated; D u / tp added on every rank before the sum, so its gradient is partial per rank
        self.D = declare(nn.Parameter(torch.empty(d_model)), init=normal(1.0), partial_grad_over_tp=dims.tp > 1)

    def discretized(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Lambda_bar [P'/tp, 2], B_bar [P'/tp, H, 2])``, complex pairs in real ``dtype``."""
        Lambda = torch.stack([self.lambda_re, self.lambda_im], -1).to(dtype)
        return zoh(Lambda, self.B.to(dtype), torch.exp(self.log_step.to(dtype)))

    @staticmethod
    def inputs(u: torch.Tensor, B_bar: torch.Tensor) -> torch.Tensor:
        """``B_bar u_t`` of a real ``u [..., H]``: complex pairs ``[..., P'/tp, 2]``."""
        return torch.einsum("...h,phk->...pk", u, B_bar.to(u.dtype))

    def readout(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``(2) Re(C~ x) + D u / tp`` of the states ``x [..., P'/tp, 2]``: this rank's part of ``y`` (real, ``u``'s
        dtype). ``Re(C~ x) = Re C~ Re x - Im C~ Im x``."""
        y = torch.einsum("...pk,hpk->...h", x.to(u.dtype), cx.conj(self.C.to(u.dtype)))
        return y * (2.0 if self.conj_sym else 1.0) + self.D.to(u.dtype) * u / self.dims.tp

    def forward(self, u: torch.Tensor, reset: torch.Tensor | None = None) -> torch.Tensor:  # [s, b, H]
        """``reset [s, b]``: a document's first token, where ``x_{t-1}`` is dropped (``Lambda_bar`` -> 0)."""
        return self.readout(self.states(u, reset), at_least_fp32(u))

    def states(self, u: torch.Tensor, reset: torch.Tensor | None = None) -> torch.Tensor:  # [s, b, P'/tp, 2]
        """Every state ``x_t`` (``forward`` before the readout), complex pairs."""
        u = at_least_fp32(u)
        Lambda_bar, B_bar = self.discretized(u.dtype)
        bu = self.inputs(u, B_bar)  # [s, b, P'/tp, 2]
        first = torch.zeros(u.shape[:2], dtype=torch.bool, device=u.device)
        first[0] = self.dims.cp_rank == 0
        reset = first if reset is None else reset | first
        a = torch.where(reset[..., None, None], torch.zeros_like(Lambda_bar), Lambda_bar)  # [s, b, P'/tp, 2]
        if torch.compiler.is_exporting():  # a graph for ONNX, which has no complex tensors: the scan on the pairs
            return associative_scan(a, bu)
        # the scan's Triton kernel (on the pairs again inside) and the context-parallel fold take torch complex
        # tensors; without a kernel, the same Hillis-Steele scan in complex arithmetic (chimera.models.ops.dispatch)
        h = linear_scan_across(dispatch.scan_with(self.kernels), cx.as_complex(a), cx.as_complex(bu), self.dims)[0]
        return cx.as_pairs(h)

    def init_state(self, batch: int) -> torch.Tensor:  # [b, P'/tp, 2]: complex pairs
        dtype = at_least_fp32(self.lambda_re).dtype
        return torch.zeros(batch, self.lambda_re.shape[0], 2, dtype=dtype, device=self.lambda_re.device)

    def step(self, u: torch.Tensor, x: torch.Tensor, first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One token ``u [b, H]``, state ``x [b, P'/tp, 2]`` -> (this rank's ``y`` ``[b, H]``, new state)."""
        u = at_least_fp32(u)
        Lambda_bar, B_bar = self.discretized(u.dtype)
        bu = self.inputs(u, B_bar)
        x = bu if first else cx.mul(Lambda_bar, x.to(u.dtype)) + bu
        return self.readout(x, u), x


class S5Layer(nn.Module):
    """Symbol ``S``: ``GELU(S5(u))`` on ``[s, b, d_model]``."""

    ROW_POSITIONS = True  # step takes each row's position (chimera.models.positions)

    metrics_group = "s5"

    def __init__(self, d_model: int, state: int, *, conj_sym: bool, dt_min: float, dt_max: float, lr_scale: float,
                 monitor_eps: float, dims: ParallelDims, kernels: str = "auto"):
        super().__init__()
        self.dims, self.monitor_eps = dims, monitor_eps
        self.ssm = S5SSM(d_model, state, conj_sym=conj_sym, dt_min=dt_min, dt_max=dt_max, lr_scale=lr_scale,
                         dims=dims, kernels=kernels)

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:  # [s, b, d] -> [s(/tp), b, d]
        y = self.ssm(x, None if docs is None else docs.starts).to(x.dtype)
        return F.gelu(leave_tensor_parallel(y, self.dims, self.dims.sequence_parallel), approximate="tanh")

    def init_state(self, batch: int, max_len: int):
        return {"x": self.ssm.init_state(batch)}

    def prefill(self, x: torch.Tensor, max_len: int):  # x: [s, b, d] -> (out, state): the scan's last state
        states = self.ssm.states(x)
        y = self.ssm.readout(states, at_least_fp32(x)).to(x.dtype)
        return F.gelu(leave_tensor_parallel(y, self.dims, False), approximate="tanh"), {"x": states[-1]}

    def step(self, x: torch.Tensor, state, pos: int) -> torch.Tensor:  # x: [1, b, d]
        y, state["x"] = self.ssm.step(x[0], state["x"], first=at_start(pos))
        return F.gelu(leave_tensor_parallel(y.to(x.dtype).unsqueeze(0), self.dims, False), approximate="tanh")

    @torch.no_grad()
    def metrics(self) -> dict:
        """``max |Lambda_bar|`` and the fraction of states with ``|Lambda_bar| > 1 - eps``, over all the layer's
        states (a max and a sum over TP ranks); none while the parameters are elsewhere (meta, ZeRO-3)."""
        p = self.ssm.lambda_re
        if p.is_meta or p.numel() == 0:
            return {}
        magnitude = cx.abs(self.ssm.discretized(torch.float64)[0])
        largest = magnitude.max().reshape(1)
        counts = torch.stack([(magnitude > 1 - self.monitor_eps).sum(), torch.tensor(magnitude.numel())]).double()
        if self.dims.communicates:
            dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=self.dims.tp_group)
            dist.all_reduce(counts, group=self.dims.tp_group)
        return {"max_abs_lambda_bar": round(float(largest), 6),
                "near_unit_fraction": round(float(counts[0] / counts[1]), 6)}


def build(c: S5Config, b: Build) -> S5Layer:
    return S5Layer(c.d_model, c.s5_state, conj_sym=c.s5_conj_sym, dt_min=c.s5_dt_min, dt_max=c.s5_dt_max,
                   lr_scale=c.s5_lr_scale, monitor_eps=c.s5_monitor_eps, dims=b.dims, kernels=c.kernels)


def check_tensor_parallel(c: S5Config, tp: int) -> str | None:
    """States split over ranks."""
    return divisibility(tp, {"the S5 stored states (model.s5_state, halved with s5_conj_sym)": c.stored_states})


def flops_per_token(c: S5Config, seq_len: int) -> dict[str, float]:
    """Per stored (complex) state and channel: ``B_bar u`` with a real input, two real products (4 FLOPs), and
    ``Re(C~ x)``, two real products (4); per stored state the recurrence ``x = Lambda_bar x + B_bar u``, a complex
    multiply-add (8). The discretisation is per parameter, not per token; ``D u`` and GELU are pointwise. (The
    reference's log-depth scan does ``log2 s`` times the recurrence's work; these are the model's FLOPs.)"""
    p, h = c.stored_states, c.d_model
    return {"input": 4.0 * p * h, "read-out": 4.0 * p * h, "scan": 8.0 * p}


SPECS = (SublayerSpec("S", "S5 diagonal MIMO state space layer", S5Config, build, check_tensor_parallel,
                      lambda c: ContextParallel("state"), flops_per_token=flops_per_token),)
