"""Mamba-2: the SSD (state space duality) mixer (Dao & Gu, arXiv 2405.21060).

Block (Sec. 7.1, Fig. 6: "parallel" projections), with ``d_inner = expand * d_model`` split into
``H = d_inner / P`` heads of ``P = head_dim`` channels, and ``G = n_groups`` groups of heads sharing
``B`` and ``C`` (the grouped multi-value pattern of Sec. 7.2, like grouped-query attention)::

    z, x, B, C, dt = W_z u, W_x u, W_B u, W_C u, W_dt u     # in_proj: [d_inner | d_inner | G N | G N | H]
    x, B, C = SiLU(Conv1D_k(x, B, C))                        # depthwise causal conv of width k = d_conv
    y   = SSD(x, dt, A, B, C) + D * x                        # below, per head
    out = W_out (w * RMSNorm_G(y * SiLU(z)))                 # gated RMSNorm over each group's channels

SSD per head ``h`` (Sec. 2-3: the SSM recurrence (1) with scalar-times-identity ``A_t``), state
``[P, N]`` with ``N = d_state``, ``B_t, C_t`` those of the head's group::

    dt_t = softplus(W_dt u_t + dt_bias)                      # [H]
    A    = -exp(A_log)                                       # one scalar per head
    h_t  = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T              # [P, N]
    y_t  = h_t C_t + D x_t

The parameterisation is HF transformers' ``Mamba2Mixer`` (``torch_forward``; ``time_step_limit``
``(dt_min, inf)``: 0 by default, i.e. no clamp; Zamba2 clamps at 1e-3; ``norm_before_gate=False``) and its
initialisation: ``A_log = log(1..H)``, ``D = 1``, ``dt_bias = softplus^-1(dt)`` with
``dt ~ log-uniform[1e-3, 1e-1]``. Names differ: HF's ``in_proj`` is split here into ``in_proj_z``,
``in_proj_x``, ``in_proj_bc``, ``in_proj_dt``, its ``conv1d`` over ``concat(x, B, C)`` into
``conv_x`` and ``conv_bc`` (weights ``[channels, k]``, HF's are ``[channels, 1, k]``), its
``norm.weight`` is ``norm_weight``. ``in_proj_bc``'s output (and ``conv_bc``'s channels) is ordered
group-major, ``[G, (B, C), N]``, so that a contiguous split is a split by group; HF's order is
``[B (G, N), C (G, N)]``.

Tensor parallelism splits heads: ``in_proj_z``, ``in_proj_x``, ``in_proj_dt`` (column parallel),
``conv_x``, ``dt_bias``, ``A_log``, ``D`` and the norm weight split with them; ``out_proj`` is row
parallel. ``B`` and ``C`` split by group when TP divides ``n_groups``; otherwise every rank holds all
groups (the rank's heads pick theirs), and their projection's and conv's gradients, partial per rank,
are summed over TP. The gated norm normalises each group's ``d_inner / G`` channels: when a group
spans ranks (TP does not divide ``n_groups``), the per-group sums of squares are all-reduced over TP
(a ``[s, b, G]`` tensor), so every TP size computes the same function. Constraints: ``head_dim``
divides ``d_inner``, ``n_groups`` divides the number of heads, TP divides the number of heads.

Reference: ``forward`` runs the chunked SSD algorithm (Sec. 6, Listing 1) in fp32: within a chunk
the quadratic "masked attention" form with a segment-sum decay matrix, between chunks the state
recurrence by a parallel scan over chunks (``chimera.models.scan``); no loop over tokens. A group's heads share
``B`` and ``C``, so what depends on them alone is computed once per group, not per head: the chunk's ``C B^T``
(then weighted by each head's decay), and the contractions with ``B`` (the chunks' states) and ``C`` (the entering
state read out) as one matmul over the group's heads side by side. ``step``
advances one token with O(1) state (conv windows + the ``[H, P, N]`` SSM state). Context parallelism
carries exactly that state between sequence chunks on different ranks: the convs' inputs as halos, and
the SSM state continuing the scan over chunks across ranks (``chimera.parallel.context``).

Packed documents: the convs keep their taps within a document and the SSM's decay is 0 at a
document's first token (its log is ``-inf``), so the state never crosses a boundary.
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
from chimera.models.scan import log_decay_after
from chimera.models.spec import Build, ContextParallel, SublayerConfig, SublayerSpec
from chimera.parallel.context import linear_scan_across
from chimera.parallel.dims import SINGLE_PROCESS, ParallelDims
from chimera.parallel.layers import ColumnParallel, RowParallel, sum_over_tensor_parallel
from chimera.parallel.sharding import declare, normal, ones, zeros

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4  # dt's initial range, as in HF / mamba_ssm


class Mamba2Config(SublayerConfig):
    """The ``model:`` fields of the Mamba-2 mixer (symbol ``M``)."""

    ssm_state: int = Field(16, ge=1, description="Mamba: state size N per channel (Mamba-2: per head)")
    ssm_expand: int = Field(2, ge=1, description="Mamba: inner width = ssm_expand x d_model")
    ssm_head_dim: int = Field(64, ge=1, description="Mamba-2: head dimension")
    ssm_groups: int = Field(1, ge=1, description="Mamba-2: groups sharing B and C")
    ssm_chunk: int = Field(64, ge=1, description="Mamba-2: chunk length of the SSD reference")
    ssm_dt_min: float = Field(0.0, ge=0, description="Mamba-2: dt is clamped to at least this (Zamba2: 1e-3)")
    ssm_norm_eps: float | None = Field(None, gt=0, description="Mamba-2: eps of the gated RMSNorm "
                                       "(resolved: norm_eps)")
    conv_kernel: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _resolve(self):
        inner = self.ssm_expand * self.d_model
        if inner % self.ssm_head_dim:
            raise ValueError(f"ssm_head_dim={self.ssm_head_dim} does not divide the Mamba-2 inner width "
                             f"ssm_expand x d_model = {inner}")
        if self.heads % self.ssm_groups:
            raise ValueError(f"ssm_groups={self.ssm_groups} does not divide the Mamba-2 heads {self.heads}")
        self.ssm_norm_eps = self.ssm_norm_eps or self.norm_eps
        return self

    @property
    def heads(self) -> int:
        return self.ssm_expand * self.d_model // self.ssm_head_dim


def _a_log_init(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``A_h = -h`` for heads ``h = 1..H``, stored as ``A_log = log h``."""
    return t.copy_(torch.log(torch.arange(1, t.shape[0] + 1, dtype=t.dtype)))


def _dt_bias_init(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``softplus(dt_bias) = dt ~ log-uniform[DT_MIN, DT_MAX]`` (floored at DT_FLOOR)."""
    dt = t.uniform_(math.log(DT_MIN), math.log(DT_MAX), generator=g).exp_().clamp_(min=DT_FLOOR)
    return t.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1



def segsum(log_a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum_{j < k <= i} log_a[..., k]`` for ``i >= j``, ``-inf`` above the diagonal.

    Masked cumulative sums rather than differences of one cumulative sum: exact when some entries
    are ``-inf`` (document starts), where a difference would give ``inf - inf``.
    """
    q = log_a.shape[-1]
    lower = torch.ones(q, q, dtype=torch.bool, device=log_a.device).tril()
    terms = log_a.unsqueeze(-1).expand(*log_a.shape, q)  # [..., i, j] = log_a[..., i]
    sums = terms.masked_fill(~lower.tril(-1), 0.0).cumsum(-2)
    return sums.masked_fill(~lower, -math.inf)


def cumulative_log_decay(log_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cum, document)`` of ``log_a [..., q]``: ``cum`` the sum of the finite logs after the chunk's first entry
    (which no product includes, so its gradient is exactly 0), ``document`` each position's document index in the chunk
    (a start, ``log a = -inf``, begins a new one); the decay from ``s`` to ``l >= s`` is ``exp(cum_l - cum_s)`` within a
    document, else 0."""
    starts = torch.isinf(log_a)
    return F.pad(log_a.masked_fill(starts, 0.0)[..., 1:].cumsum(-1), (1, 0)), starts.cumsum(-1)


def hidden(document: torch.Tensor) -> torch.Tensor:
    """Where ``decay[..., l, s]`` is 0: ``s > l`` or another document; ``[q, q]`` when no document starts inside
    (and nothing traces the model)."""
    q = document.shape[-1]
    later = torch.ones(q, q, dtype=torch.bool, device=document.device).triu(1)
    if not dispatch.tracing() and not bool(document[..., -1].any()):  # data-dependent: not under export
        return later
    return later | (document.unsqueeze(-1) != document.unsqueeze(-2))


def chunk_decay(log_a: torch.Tensor) -> torch.Tensor:
    """``exp(segsum(log_a))``, ``decay[..., l, s] = prod_{s < k <= l} a_k`` (0 for ``s > l`` and across a document
    start, where ``log a = -inf``), from one cumulative sum: ``exp(cum_l - cum_s)`` where ``l >= s`` lie in one
    document (``cumulative_log_decay``). A sum, a select and an exponential over ``[q, q]``, where ``segsum`` runs a
    cumulative sum down every column (and its backward a flipped one); rounding: ``|cum|`` times fp32's epsilon in
    the exponent."""
    cum, document = cumulative_log_decay(log_a)
    exponent = cum.unsqueeze(-1) + (-cum).unsqueeze(-2)  # cum_l - cum_s (a sum: no negation of the [q, q] gradient)
    return torch.exp(exponent.masked_fill(hidden(document), -math.inf))


def within_chunks(C: torch.Tensor, B: torch.Tensor, xdt: torch.Tensor, log_a: torch.Tensor) -> torch.Tensor:
    """Step 1 of ``ssd``, the diagonal blocks: ``y_l = sum_{s <= l} (C_l . B_s) decay[l, s] xdt_s`` within each chunk
    (``C, B [..., q, n]``, broadcast against ``xdt [..., q, p]`` and ``log_a [..., q]``: a group's ``C B^T`` once for
    its heads); its Triton kernel: ``chimera.models.ops.ssd``; on CPU ``chimera.models.ops.ssd_cpu``."""
    decay = chunk_decay(log_a)  # [..., l, s]: prod_{s < k <= l} a_k, 0 for s > l
    return (torch.matmul(C, B.transpose(-1, -2)) * decay) @ xdt


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int,
        reset: torch.Tensor | None = None, dims: ParallelDims = SINGLE_PROCESS, kernels: str = "auto",
        D: torch.Tensor | None = None) -> torch.Tensor:
    """``y_t = C_t . h_t + D x_t`` of ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T`` for a whole sequence, chunked.

    ``x [s, b, h, p]``, ``dt [s, b, h]``, ``A [h]``, ``B, C [s, b, g, n]`` -> ``y [s, b, h, p]``: ``g`` groups of
    ``h / g`` consecutive heads, each group's heads reading its ``B, C`` (``g = h``: a ``B, C`` per head);
    ``reset [s, b]`` marks tokens where ``h_{t-1}`` is dropped (decay 0); ``D [h]``: the skip, none if None.
    Inside, tensors are ``[b, g, h / g, c, q, ...]`` (chunk ``c``, position ``q`` in it; ``B, C`` without the
    heads' axis), so that every contraction is a batched matmul without further copies of ``B`` or ``C`` per head;
    states are held as ``[n, p]``. Under context parallelism ``x`` ... ``C`` are this rank's part of the sequence; the
    scan between chunks (step 3) continues from the state the earlier ranks' chunks leave
    (``chimera.parallel.context``). ``kernels``: ``model.kernels`` for step 1 and the scan of step 3
    (``chimera.models.ops.dispatch``).
    """
    s = x.shape[0]
    xdt, log_a, B, C = chunked_inputs(x, dt, A, B, C, chunk_size, reset)

    # 1. Within a chunk (diagonal blocks): y_l = sum_{s <= l} (C_l . B_s) decay[l, s] dt_s x_s.
    y = dispatch.ssd_within_chunks(C.unsqueeze(2), B.unsqueeze(2), xdt, log_a, kernels=kernels)  # [b, g, h/g, c, l, p]

    # 2. Each chunk's own tokens in the state at its end: sum_s B_s (decay[q-1, s] dt_s x_s)^T, where
    # decay[q-1, s] = prod_{k > s} a_k (in the chunk); B_s^T against all the group's heads at once.
    to_end, from_start, whole = boundary_decays(log_a)  # [b, g, h/g, c, q], the same and [b, g, h/g, c]
    chunk_states = torch.einsum("bgcqn,bghcqp->bghcnp", B, xdt * to_end.unsqueeze(-1)).flatten(1, 2)  # [b,h,c,n,p]

    # 3. Between chunks: h_end[c] = (prod of chunk c's decays) h_end[c-1] + chunk_states[c].
    ends, first = linear_scan_across(dispatch.scan_with(kernels), whole.flatten(1, 2).movedim(2, 0)[..., None, None],
                                     chunk_states.movedim(2, 0), dims)
    first = torch.zeros_like(ends[:1]) if first is None else first.unsqueeze(0)  # the state before the 1st chunk
    # the state before each chunk [b, g, h/g, c, n, p]
    entering = torch.cat([first, ends[:-1]]).movedim(0, 2).unflatten(1, xdt.shape[1:3])

    # 4. The entering state read out inside the chunk: y_l += (prod_{k <= l} a_k) C_l . h_entering.
    y = y + torch.einsum("bgcqn,bghcnp->bghcqp", C, entering) * from_start.unsqueeze(-1)
    y = y.flatten(1, 2).flatten(2, 3).movedim(2, 0)[:s]
    return y if D is None else y + D.unsqueeze(-1) * x


def chunked_inputs(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   chunk_size: int, reset: torch.Tensor | None):
    """``ssd``'s inputs in its chunked layout: ``xdt = dt x [b, g, h/g, c, q, p]``, the log decay ``log_a = dt A``
    (``-inf`` at resets) ``[b, g, h/g, c, q]``, and ``B, C [b, g, c, q, n]``; the sequence zero-padded at the end to
    whole chunks (decay 1, no input)."""
    g = B.shape[2]
    log_a, B, C = chunked_decays_and_state_vectors(dt, A, B, C, chunk_size, reset)
    return by_group(chunks(x * dt.unsqueeze(-1), chunk_size), g), log_a, B, C


def chunks(t: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[s, b, h, ...] -> [b, h, c, q, ...]``, zero-padded at the end to whole chunks."""
    t = F.pad(t, (0, 0) * (t.dim() - 1) + (0, -t.shape[0] % chunk_size)).movedim(0, 2).contiguous()
    return t.unflatten(2, (-1, chunk_size))


def by_group(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``[b, h, ...] -> [b, g, h / g, ...]``."""
    return t.unflatten(1, (groups, t.shape[1] // groups))


def chunked_decays_and_state_vectors(dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                                     chunk_size: int, reset: torch.Tensor | None):
    """``chunked_inputs`` but ``xdt``: ``log_a [b, g, h/g, c, q]`` and ``B, C [b, g, c, q, n]``."""
    log_a = dt * A  # log of the decay, <= 0
    if reset is not None:
        log_a = log_a.masked_fill(reset.unsqueeze(-1), -math.inf)
    return by_group(chunks(log_a, chunk_size), B.shape[2]), chunks(B, chunk_size), chunks(C, chunk_size)


def boundary_decays(log_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decays between a chunk's positions and its ends, of ``log_a [..., q]``: ``prod_{k > s} a_k`` (what an input
    at ``s`` keeps by the chunk's end), ``prod_{k <= l} a_k`` (what the state entering the chunk keeps at ``l``), and
    the whole chunk's ``prod_k a_k`` ``[...]``. The first a reversed cumulative sum of the later terms alone, so no
    ``-inf`` (a reset) is ever subtracted."""
    from_start = log_a.cumsum(-1)  # log prod_{k <= l} a_k
    to_end = log_decay_after(log_a.movedim(-1, 0)).movedim(0, -1)
    return torch.exp(to_end), torch.exp(from_start), torch.exp(from_start[..., -1])


class Mamba2Mixer(nn.Module):
    """The Mamba-2 block: ``[s, b, d_model] -> [s, b, d_model]``, over this rank's heads."""

    ROW_POSITIONS = True  # step takes each row's position (chimera.models.positions)

    def __init__(self, d_model: int, *, d_state: int = 128, d_conv: int = 4, expand: int = 2, head_dim: int = 64,
                 n_groups: int = 1, chunk_size: int = 64, conv_bias: bool = True, bias: bool = False,
                 norm_eps: float = 1e-5, dt_min: float = 0.0, init_std: float, out_std: float,
                 dims: ParallelDims, kernels: str = "auto"):
        super().__init__()
        self.kernels = kernels
        d_inner = expand * d_model
        if d_inner % head_dim:
            raise ValueError(f"head_dim={head_dim} does not divide d_inner={d_inner} (expand * d_model)")
        n_heads = d_inner // head_dim
        if n_heads % n_groups:
            raise ValueError(f"n_groups={n_groups} does not divide the number of heads {n_heads}")
        self.head_dim, self.d_state, self.chunk_size, self.norm_eps = head_dim, d_state, chunk_size, norm_eps
        self.dt_min = dt_min
        self.dims = dims
        self.heads_local = dims.local(n_heads, "n_heads")
        heads_per_group = n_heads // n_groups
        self.group_width = heads_per_group * head_dim  # channels normalised together
        groups_split = n_groups % dims.tp == 0
        # A group's norm spans ranks: its sums of squares are summed over TP.
        self.norm_over_tp = not groups_split and dims.tp > 1

        # [d_inner / tp, d_model] (+ bias [d_inner / tp]): split along dim 0, with the heads.
        self.in_proj_z = ColumnParallel(d_model, d_inner, dims, init=normal(init_std), bias=bias)
        self.in_proj_x = ColumnParallel(d_model, d_inner, dims, init=normal(init_std), bias=bias)
        if groups_split:
            # [2 G N / tp, d_model]: split along dim 0 by group (rows ordered [G, (B, C), N]).
            self.in_proj_bc = ColumnParallel(d_model, 2 * n_groups * d_state, dims, init=normal(init_std), bias=bias)
            n_slots, first_group = n_groups // dims.tp, dims.tp_rank * n_groups // dims.tp
        else:
            # [2 G N, d_model]: replicated (fewer groups than ranks); gradient partial per rank.
            self.in_proj_bc = nn.Linear(d_model, 2 * n_groups * d_state, bias=bias)
            declare(self.in_proj_bc.weight, init=normal(init_std), partial_grad_over_tp=dims.tp > 1)
            if bias:
                declare(self.in_proj_bc.bias, init=zeros, partial_grad_over_tp=dims.tp > 1)
            n_slots, first_group = n_groups, 0
        # [H / tp, d_model] (+ bias [H / tp]): split along dim 0, with the heads.
        self.in_proj_dt = ColumnParallel(d_model, n_heads, dims, init=normal(init_std), bias=bias)

        # [d_inner / tp, k] and [d_inner / tp]: split along dim 0, with the heads.
        self.conv_x = CausalConv1d(self.heads_local * head_dim, d_conv, bias=conv_bias, dims=dims,
                                   kernels=kernels)
        # [2 G N / tp, k] and [2 G N / tp]: split along dim 0 by group, or replicated like in_proj_bc.
        self.conv_bc = CausalConv1d(2 * n_slots * d_state, d_conv, bias=conv_bias, split=groups_split,
                                    partial_grad_over_tp=dims.tp > 1, dims=dims, kernels=kernels)

        def head_param(init):  # [H / tp]: split along dim 0, with the heads; never weight-decayed
            return declare(nn.Parameter(torch.empty(self.heads_local)), init=init, split_dim=0, weight_decay=False)

        self.dt_bias = head_param(_dt_bias_init)
        self.A_log = head_param(_a_log_init)
        self.D = head_param(ones)
        # [d_inner / tp]: split along dim 0, with the heads; whole groups of it on a rank unless norm_over_tp.
        self.norm_weight = declare(nn.Parameter(torch.empty(self.heads_local * head_dim)), init=ones, split_dim=0,
                                   weight_decay=False)
        # [d_model, d_inner / tp]: split along dim 1; output all-reduced (or reduce-scattered).
        self.out_proj = RowParallel(d_inner, d_model, dims, init=normal(out_std), bias=bias)

        global_heads = torch.arange(self.heads_local, device="cpu") + dims.tp_rank * self.heads_local
        # For each local head, its group among those held here (B/C slot, norm group); on the CPU even on a
        # meta build (an index from the layout, not a weight).
        self.register_buffer("group_of_head", global_heads // heads_per_group - first_group, persistent=False)
        self.n_slots, self.heads_per_group = n_slots, heads_per_group
        # This rank's heads among the heads of the groups held here: a contiguous range from this offset.
        self.first_head_slot = dims.tp_rank * self.heads_local - first_group * heads_per_group
        # An optional map of the state's input and read-out vectors (B, C) -> (B', C') with ``size`` entries each,
        # e.g. a lower-rank state (``chimera.models.mixers.routed_hybrid``); None: the full d_state.
        self.state_projection: nn.Module | None = None

    def _state_vectors(self, B: torch.Tensor, C: torch.Tensor):
        return (B, C) if self.state_projection is None else self.state_projection(B, C)

    def _project(self, u: torch.Tensor):
        return self.in_proj_z(u), self.in_proj_x(u), self.in_proj_bc(u), self.in_proj_dt(u)

    def _ssm_inputs(self, x: torch.Tensor, bc: torch.Tensor, dt: torch.Tensor, per_head: bool = True):
        """In fp32: ``x [..., h, p]``, ``B, C [..., h, n]`` per head (or, ``per_head=False``, ``[..., g, n]`` for ``g``
        groups of this rank's heads, ``_groups_of_local_heads``), ``dt = max(softplus(dt + dt_bias), dt_min)``."""
        x = at_least_fp32(x).unflatten(-1, (self.heads_local, self.head_dim))
        # B and C apart (unbind: its backward stacks the two gradients, where a select's fills a zero one of the
        # whole), then this rank's heads' groups or each group's repeated for its heads
        B, C = at_least_fp32(bc).unflatten(-1, (self.n_slots, 1, 2, self.d_state)).unbind(-2)
        dt = F.softplus(at_least_fp32(dt) + self.dt_bias)
        if self.dt_min > 0:
            dt = dt.clamp(min=self.dt_min)
        of_heads = self._heads_of_groups if per_head else self._groups_of_local_heads
        return x, of_heads(B), of_heads(C), dt

    def _groups_of_local_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[..., slots, 1, n]`` -> ``[..., g, n]``, ``g`` groups of this rank's heads in order, ``heads / tp / g``
        each: the groups held here where this rank's heads are whole groups, the one group where they lie in one (TP
        splits a group), else one vector per head (``_heads_of_groups``)."""
        per_group, first, local = self.heads_per_group, self.first_head_slot, self.heads_local
        if first % per_group == 0 and local % per_group == 0:  # whole groups: then exactly those held here
            return t.squeeze(-2)
        if first // per_group == (first + local - 1) // per_group:  # all within one group
            return t.squeeze(-2).narrow(-2, first // per_group, 1)
        return self._heads_of_groups(t)

    def _heads_of_groups(self, t: torch.Tensor) -> torch.Tensor:
        """``[..., groups, 1, n]`` -> ``[..., heads / tp, n]``: each group's vector for each of this rank's heads."""
        t = t.expand(*t.shape[:-2], self.heads_per_group, self.d_state).flatten(-3, -2)
        if t.shape[-2] != self.heads_local:  # some heads elsewhere (TP); narrow's backward fills a zero gradient
            t = t.narrow(-2, self.first_head_slot, self.heads_local)
        return t

    def _gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``w * RMSNorm(y * SiLU(z))`` over each group's channels (HF ``MambaRMSNormGated``), cast to ``z``'s dtype.
        On CPU, with whole groups on this rank, ``auto`` takes it with the backward by hand
        (``chimera.models.ops.rmsnorm_cpu``)."""
        if dispatch.cpu_fast_path(self.kernels, y.device) and not self.norm_over_tp:
            from chimera.models.ops import rmsnorm_cpu

            return rmsnorm_cpu.rms_norm(y, self.norm_weight, self.norm_eps, gate=z, groups=self.n_slots, dtype=z.dtype)
        g = (y * F.silu(at_least_fp32(z))).unflatten(-1, (self.heads_local, self.head_dim))
        sq = g.pow(2).sum(-1)  # [..., h]
        per_group = sq.new_zeros(*sq.shape[:-1], self.n_slots).index_add(-1, self.group_of_head, sq)
        if self.norm_over_tp:
            per_group = sum_over_tensor_parallel(per_group, self.dims)
        mean_sq = per_group[..., self.group_of_head] / self.group_width
        g = (g * torch.rsqrt(mean_sq + self.norm_eps).unsqueeze(-1)).flatten(-2)
        return (g * self.norm_weight).to(z.dtype)

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:  # [s, b, d] -> [s, b, d]
        """``docs``: packed documents (``chimera.models.documents``); state never crosses a boundary."""
        reset = None if docs is None else docs.starts
        z, xs, bc, dt = self._project(x)
        xs, bc = F.silu(self.conv_x(xs, docs)), F.silu(self.conv_bc(bc, docs))
        xh, B, C, dt = self._ssm_inputs(xs, bc, dt, per_head=False)
        B, C = self._state_vectors(B, C)
        A = -torch.exp(at_least_fp32(self.A_log))
        y = dispatch.ssd(xh, dt, A, B, C, self.chunk_size, reset, self.dims, self.kernels, D=self.D)
        return self.out_proj(self._gated_norm(y.flatten(-2), z))

    def init_state(self, batch: int, max_len: int):
        w = self.conv_x.weight
        return {
            "conv_x": self.conv_x.init_state(batch, device=w.device, dtype=w.dtype),
            "conv_bc": self.conv_bc.init_state(batch, device=w.device, dtype=w.dtype),
            "ssm": torch.zeros(batch, self.heads_local, self.head_dim,
                               self.d_state if self.state_projection is None else self.state_projection.size,
                               device=w.device,
                               dtype=torch.promote_types(w.dtype, torch.float32)),
        }

    def prefill(self, x: torch.Tensor, max_len: int):  # x: [s, b, d] -> (out, state)
        """The prompt through ``forward``; the state from the same inputs: both convs' last inputs and the last SSM
        state ``h_T = sum_s exp(dt_{s+1} A + ... + dt_T A) dt_s x_s B_s^T``, a weighted sum over the prompt (the
        chunked scan keeps only chunk-end states, so the projections and convs are recomputed, not the scan)."""
        _, xs, bc, dt = self._project(x)
        xh, B, C, dt = self._ssm_inputs(F.silu(self.conv_x(xs)), F.silu(self.conv_bc(bc)), dt)
        B, _ = self._state_vectors(B, C)
        weight = torch.exp(log_decay_after(dt * -torch.exp(at_least_fp32(self.A_log)))) * dt  # [s, b, h]
        return self.forward(x), {"conv_x": self.conv_x.state_after(xs), "conv_bc": self.conv_bc.state_after(bc),
                                 "ssm": torch.einsum("sbh,sbhp,sbhn->bhpn", weight, xh, B)}

    def step(self, x: torch.Tensor, state, pos: int) -> torch.Tensor:  # x: [1, b, d]
        z, xs, bc, dt = (t[0] for t in self._project(x))
        xs, state["conv_x"] = self.conv_x.step(xs, state["conv_x"])
        bc, state["conv_bc"] = self.conv_bc.step(bc, state["conv_bc"])
        xh, B, C, dt = self._ssm_inputs(F.silu(xs), F.silu(bc), dt)
        B, C = self._state_vectors(B, C)
        A = -torch.exp(at_least_fp32(self.A_log))
        h = torch.exp(dt * A)[..., None, None] * state["ssm"] + (dt.unsqueeze(-1) * xh).unsqueeze(-1) * B.unsqueeze(-2)
        state["ssm"] = h
        y = torch.einsum("bhpn,bhn->bhp", h, C) + self.D.unsqueeze(-1) * xh
        return self.out_proj(self._gated_norm(y.flatten(-2), z).unsqueeze(0))


def build(c: Mamba2Config, b: Build) -> Mamba2Mixer:
    return Mamba2Mixer(c.d_model, d_state=c.ssm_state, d_conv=c.conv_kernel, expand=c.ssm_expand,
                       head_dim=c.ssm_head_dim, n_groups=c.ssm_groups, chunk_size=c.ssm_chunk, norm_eps=c.ssm_norm_eps,
                       dt_min=c.ssm_dt_min, init_std=b.init_std, out_std=b.out_std, dims=b.dims,
                       kernels=c.kernels)


def check_tensor_parallel(c: Mamba2Config, tp: int) -> str | None:
    """Heads split over ranks (B and C by group where TP divides the groups, else replicated)."""
    inner = c.ssm_expand * c.d_model
    if inner % tp:
        return f"parallel.tensor={tp} does not divide the Mamba inner width model.ssm_expand x model.d_model = {inner}"
    if c.heads % tp:
        return f"parallel.tensor={tp} does not divide the Mamba-2 heads (ssm_expand x d_model / ssm_head_dim = " \
               f"{c.heads})"
    return None


def flops_per_token(c: Mamba2Config, seq_len: int) -> dict[str, float]:
    """``in_proj`` (z, x, B and C of each group, dt) and ``out_proj``, 2 per weight; the convs' taps over x, B, C;
    the chunked SSD (``ssd``'s steps, chunk ``q = min(ssm_chunk, s)``), per token: 1. ``C B^T`` within the chunk,
    once per group (``2 q N``), and the weighted inputs per head (``2 q P``); 2. the chunk's state ``B^T (dt x)``
    (``2 N P`` per head); 3. state passing between chunks (``2 N P / q`` per head); 4. the entering state's
    read-out ``C h`` (``2 N P`` per head). Decays, ``D x`` and the gated norm are pointwise (not counted)."""
    d, inner, n, p, g, h = c.d_model, c.ssm_expand * c.d_model, c.ssm_state, c.ssm_head_dim, c.ssm_groups, c.heads
    q = min(c.ssm_chunk, seq_len)
    return {"projections": 2.0 * (d * (2 * inner + 2 * g * n + h) + inner * d),
            "conv": 2.0 * c.conv_kernel * (inner + 2 * g * n),
            "ssd chunk products": 2.0 * q * n * g + 2.0 * q * p * h,
            "ssd states": h * (2.0 * n * p + 2.0 * n * p / q + 2.0 * n * p)}


SPECS = (SublayerSpec("M", "Mamba-2 SSD", Mamba2Config, build, check_tensor_parallel,
                      lambda c: ContextParallel("state"), flops_per_token=flops_per_token),)
