"""RWKV-6 "Finch" time mixing (Peng et al., arXiv 2404.05892, Sec. 4), symbol ``W``.

Token shift with data-dependent linear interpolation ("ddlerp", Eqs. 13-16): with ``x_{t-1}`` the previous
token's input (zeros before a sequence or document start) and ``dx_t = x_{t-1} - x_t``::

    lerp_mu(a, b) = a + (b - a) * mu
    m_*   = (tanh(lerp_{maa_x}(x_t, x_{t-1}) A) B_*)          # one LoRA, five outputs: * in w, k, v, r, g
    x*_t  = x_t + dx_t * (maa_* + m_*)

Receptance, key, value, gate and the data-dependent decay (Eqs. 17-20), per head ``h`` of ``N = head_size``
channels::

    r_t, k_t, v_t = W_r xr_t, W_k xk_t, W_v xv_t
    g_t   = SiLU(W_g xg_t)
    d_t   = time_decay + tanh(xw_t D_1) D_2                     # the decay LoRA
    w_t   = exp(-exp(d_t))                                      # in (0, 1), per key channel

The WKV (Eqs. 21-22), a matrix state ``S [N (key), N (value)]`` per head and a bonus ``u = time_faaaa`` for the
current token::

    S_t   = diag(w_t) S_{t-1} + k_t^T v_t
    o_t   = r_t (S_{t-1} + diag(u) k_t^T v_t)
    out_t = W_o (GroupNorm_H(o_t) * g_t)                        # ln_x: a GroupNorm per head, eps 64e-5

This is BlinkDL's ``rwkv`` package (0.8.32), v6.0 path: its parameter names are ours (``time_maa_x``,
``time_maa_{w,k,v,r,g}``, ``time_maa_w1 [d, 5 L]``, ``time_maa_w2 [5, L, d]``, ``time_decay``,
``time_decay_w1/w2``, ``time_faaaa [H, N]``, ``receptance``, ``key``, ``value``, ``gate``, ``output``, ``ln_x``);
its ``[1, 1, d]`` vectors are ``[d]`` here.

Reference: ``forward`` computes the WKV in chunks (``wkv``, below), in fp32 or wider, no loop over tokens:
within a chunk of ``Q`` tokens, pairs ``s < t`` with the decay ``exp(sum_{s<j<t} log w_j)`` per key channel, a
difference of log cumulative sums that is never positive (so nothing overflows); between chunks the state at
each chunk's end, by a linear scan over chunks (``chimera.models.scan``). ``model.kernels`` picks the Triton
kernels for the within-chunk step and the scan (``chimera.models.ops.rwkv6``, ``chimera.models.ops.scan``).
``step`` is the recurrence itself, one token at a time, with O(1) state (the token-shift input and ``S``).

Tensor parallelism splits heads: ``receptance``, ``key``, ``value``, ``gate`` are column parallel, ``output``
row parallel; ``time_decay``, ``time_faaaa``, ``ln_x`` and the decay LoRA's ``D_2`` (its output columns) split
with the heads. The token-shift mixing (``time_maa_*`` and its LoRA) and ``D_1`` read and make the whole
``d_model``-wide input, so every rank holds them; each rank uses them for its heads only, so their gradients
are partial per rank and summed over TP. The WKV is per head: no communication.

Context parallelism (``state``): the token shift reads the one input before a rank's chunk (a halo of 1), and
the WKV state entering the chunk is the fold of the earlier chunks' ``(decay product, final state)`` pairs, a
linear scan with a matrix state carried across ranks (``chimera.parallel.context``).

Packed documents: at a document's first token the token shift reads zeros and ``S_{t-1}`` is dropped, exactly
as if the document started a sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from chimera.models.numerics import at_least_fp32
from chimera.models.ops import dispatch
from chimera.models.scan import log_decay_after
from chimera.models.spec import Build, ContextParallel, SublayerConfig, SublayerSpec, divisibility
from chimera.parallel.context import halo, linear_scan_across
from chimera.parallel.dims import SINGLE_PROCESS, ParallelDims
from chimera.parallel.layers import ColumnParallel, RowParallel
from chimera.parallel.sharding import declare, normal, ones, zeros

MIXED = ("w", "k", "v", "r", "g")  # the order of the token-shift LoRA's outputs (BlinkDL's)


class RWKVConfig(SublayerConfig):
    """The ``model:`` fields of RWKV-6's time mix (symbol ``W``); the channel mix and GOLD read some of them."""

    rwkv_head_size: int = Field(64, ge=1, description="RWKV-6 / GOLD: channels per head (heads = d_model / this)")
    rwkv_mix_lora: int = Field(32, ge=1, description="RWKV-6 / GOLD: rank of the token-shift mixing LoRA")
    rwkv_decay_lora: int = Field(64, ge=1, description="RWKV-6: rank of the decay LoRA")
    rwkv_group_norm_eps: float = Field(64e-5, gt=0, description="RWKV-6: eps of ln_x, the per-head GroupNorm "
                                       "(1e-5 x head_size_divisor^2, divisor 8)")
    rwkv_chunk: int = Field(16, ge=1, description="RWKV-6: chunk length of the WKV reference")

    @model_validator(mode="after")
    def _check_heads(self):
        if self.d_model % self.rwkv_head_size:
            raise ValueError(f"rwkv_head_size={self.rwkv_head_size} does not divide d_model={self.d_model}; choose "
                             "a divisor of d_model")
        return self

    @property
    def heads(self) -> int:
        return self.d_model // self.rwkv_head_size


# ---- the WKV ----------------------------------------------------------------------------------------------


def within_chunks(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, before: torch.Tensor, cum: torch.Tensor,
                  document: torch.Tensor | None) -> torch.Tensor:
    """Step 1 of ``wkv`` without the bonus: ``y_t = sum_{s < t} (r_t . (k_s * exp(before_t - cum_s))) v_s`` over the
    keys of ``t``'s document (``r, k, before, cum [..., q, n]``, ``v [..., q, m]``; ``before``, ``cum``: the log
    decays before and up to each position in its chunk; ``document``: broadcastable to ``[..., q]``, each position's
    document index in its chunk, or None: one document). Its Triton kernel, the decays in registers:
    ``chimera.models.ops.rwkv6``."""
    q = r.shape[-2]
    lower = torch.ones(q, q, dtype=torch.bool, device=r.device).tril(-1)  # [t, s]: s < t
    gap = (before.unsqueeze(-2) - cum.unsqueeze(-3)).masked_fill(~lower[..., None], -math.inf)  # [.., t, s, n]
    scores = torch.einsum("...tn,...sn,...tsn->...ts", r, k, torch.exp(gap))
    if document is not None:
        scores = scores * (document[..., :, None] == document[..., None, :])  # same document
    return scores @ v


def wkv(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_w: torch.Tensor, u: torch.Tensor, chunk: int,
        reset: torch.Tensor | None = None, dims: ParallelDims = SINGLE_PROCESS, kernels: str = "auto") -> torch.Tensor:
    """``o_t = r_t (S_{t-1} + diag(u) k_t^T v_t)`` of ``S_t = diag(w_t) S_{t-1} + k_t^T v_t`` for a whole sequence.

    ``r, k, v, log_w [s, b, h, n]`` (``log_w = log w_t <= 0``), ``u [h, n]``; ``reset [s, b]`` marks the tokens
    where ``S_{t-1}`` is dropped (documents' first tokens). Inside, tensors are ``[b, h, c, q, n]`` (chunk ``c``,
    position ``q`` in it). Under context parallelism the inputs are this rank's part of the sequence and the scan
    between chunks continues from the state the earlier ranks leave. ``kernels``: ``model.kernels`` for step 1 and
    the scan of step 3 (``chimera.models.ops.dispatch``)."""
    s = r.shape[0]
    pad = -s % chunk

    def chunks(t):  # [s, b, h, n] -> [b, h, c, q, n]; zero padding at the end: decay 1, no input
        t = F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)).movedim(0, 2)
        return t.unflatten(2, (-1, chunk))

    r, k, v, log_w = chunks(r), chunks(k), chunks(v), chunks(log_w)
    # resets so far within each chunk, [b, 1, c, q, 1]: no reset in (s, t] iff the counts at s and t agree
    resets = torch.zeros(s + pad, r.shape[0], dtype=torch.long, device=r.device)
    if reset is not None:
        resets[:s] = reset.long()
    resets = resets.t().unflatten(1, (-1, chunk)).cumsum(-1)[:, None, :, :, None]

    cum = log_w.cumsum(-2)  # [b, h, c, q, n]: log prod_{j <= t} w_j within the chunk
    before = cum - log_w  # log prod_{j < t} w_j

    # 1. Within a chunk, s < t: (r_t . (k_s * prod_{s<j<t} w_j)) v_s, and the bonus for s = t.
    y = dispatch.rwkv6_within_chunks(r, k, v, before, cum, resets.squeeze(-1), kernels=kernels)
    y = y + (r * u[:, None, None] * k).sum(-1, keepdim=True) * v

    # 2. Each chunk's own tokens in the state at its end: sum_s diag(prod_{s<j<=end} w_j) k_s^T v_s.
    kept = resets[..., -1:, :] == resets  # no reset after s in the chunk
    chunk_states = (k * torch.exp(cum[..., -1:, :] - cum) * kept).transpose(-1, -2) @ v  # [b, h, c, n, n]

    # 3. Between chunks: S_end[c] = diag(prod of chunk c's w) S_end[c-1] + chunk_states[c] (0 after a reset).
    carried = torch.exp(cum[..., -1, :]) * (resets[..., -1, :] == 0)  # [b, h, c, n]
    ends, first = linear_scan_across(dispatch.scan_with(kernels), carried.movedim(2, 0).unsqueeze(-1),
                                     chunk_states.movedim(2, 0), dims)
    first = torch.zeros_like(ends[:1]) if first is None else first.unsqueeze(0)  # the state before the first chunk
    entering = torch.cat([first, ends[:-1]]).movedim(0, 2)  # [b, h, c, n, n]: the state before each chunk

    # 4. The entering state read at t: (r_t * prod_{j<t} w_j) S_entering, until the chunk's first reset.
    y = y + ((r * torch.exp(before)) @ entering) * (resets == 0)
    return y.flatten(2, 3).movedim(2, 0)[:s]


def wkv_step(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
             state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence: ``r, k, v, w [b, h, n]``, ``state [b, h, n, n]`` -> (``o [b, h, n]``, new state)."""
    kv = k.unsqueeze(-1) * v.unsqueeze(-2)  # k_t^T v_t
    out = (r.unsqueeze(-1) * (state + u.unsqueeze(-1) * kv)).sum(-2)
    return out, w.unsqueeze(-1) * state + kv


def token_shift(x: torch.Tensor, docs=None, dims: ParallelDims = SINGLE_PROCESS) -> torch.Tensor:
    """``x_{t-1}`` for every ``t`` of ``x [s, b, d]``: the rank before's last input at a chunk's start (context
    parallelism), zeros at the sequence's start and at documents' first tokens."""
    prev = torch.cat([halo(x, 1, dims), x[:-1]])
    return prev if docs is None else prev.masked_fill(docs.starts.unsqueeze(-1), 0.0)


# ---- initialisation (layer-independent forms of BlinkDL's, which depend on the layer's depth) --------------


def _ramp(power: float):
    """``1 - (i / d)^power`` over the channels: RWKV's token-shift mixing init."""
    def init(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        i = torch.arange(t.shape[-1], dtype=t.dtype) / t.shape[-1]
        return t.copy_((1.0 - i.pow(power)).expand_as(t))
    return init


def _decay_init(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``-6 + 5 (n / (d - 1))^(0.7 + 1.3 / 2)``: slow to fast decays over the channels (RWKV-6, mid-depth)."""
    n = torch.arange(t.shape[0], dtype=t.dtype) / max(t.shape[0] - 1, 1)
    return t.copy_(-6.0 + 5.0 * n.pow(1.35))


def _bonus_init(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``time_faaaa [H, N]``: ``(1 - n / (d - 1)) / 2 + zigzag`` over the flattened channels (RWKV-6, mid-depth)."""
    n = torch.arange(t.numel(), dtype=t.dtype)
    zigzag = ((n + 1) % 3 - 1) * 0.1
    return t.copy_((0.5 * (1 - n / max(t.numel() - 1, 1)) + zigzag).view_as(t))


def small_uniform(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return t.uniform_(-0.01, 0.01, generator=g)


def replicated(shape, init, dims: ParallelDims) -> nn.Parameter:
    """A parameter every TP rank holds whole and uses for its heads only: its gradient is partial per rank."""
    return declare(nn.Parameter(torch.empty(shape)), init=init, partial_grad_over_tp=dims.tp > 1,
                   weight_decay=False)


class TimeMix(nn.Module):
    """Symbol ``W``: RWKV-6's time mix over this rank's heads, ``[s, b, d] -> [s, b, d]``."""

    ROW_POSITIONS = True  # step takes each row's position (chimera.models.positions)

    def __init__(self, d_model: int, head_size: int, *, mix_lora: int = 32, decay_lora: int = 64,
                 group_norm_eps: float = 64e-5, chunk: int = 16, init_std: float, out_std: float, dims: ParallelDims,
                 kernels: str = "auto"):
        super().__init__()
        self.dims, self.head_size, self.chunk, self.group_norm_eps = dims, head_size, chunk, group_norm_eps
        self.kernels = kernels
        self.heads_local = dims.local(d_model // head_size, "RWKV heads (d_model / rwkv_head_size)")
        self.mix_lora = mix_lora
        # token-shift mixing: [d] each, and its LoRA [d, 5 L], [5, L, d]; replicated (the whole input's)
        self.time_maa_x = replicated(d_model, _ramp(0.5), dims)
        for name in MIXED:
            setattr(self, f"time_maa_{name}", replicated(d_model, _ramp(0.5), dims))
        self.time_maa_w1 = replicated((d_model, len(MIXED) * mix_lora), zeros, dims)
        self.time_maa_w2 = replicated((len(MIXED), mix_lora, d_model), small_uniform, dims)
        # decay: time_decay [d / tp] split with the heads; its LoRA D_1 [d, R] replicated, D_2 [R, d / tp] split
        self.time_decay = declare(nn.Parameter(torch.empty(self.heads_local * head_size)), init=_decay_init,
                                  split_dim=0, weight_decay=False)
        self.time_decay_w1 = replicated((d_model, decay_lora), zeros, dims)
        self.time_decay_w2 = declare(nn.Parameter(torch.empty(decay_lora, self.heads_local * head_size)),
                                     init=small_uniform, split_dim=1, weight_decay=False)
        # the bonus u [H / tp, N]: split with the heads
        self.time_faaaa = declare(nn.Parameter(torch.empty(self.heads_local, head_size)), init=_bonus_init,
                                  split_dim=0, weight_decay=False)
        # W_r, W_k, W_v, W_g [d / tp, d]: column parallel, by head; W_o [d, d / tp]: row parallel
        self.receptance = ColumnParallel(d_model, d_model, dims, init=normal(init_std))
        self.key = ColumnParallel(d_model, d_model, dims, init=normal(init_std))
        self.value = ColumnParallel(d_model, d_model, dims, init=normal(init_std))
        self.gate = ColumnParallel(d_model, d_model, dims, init=normal(init_std))
        self.output = RowParallel(d_model, d_model, dims, init=normal(out_std))
        # ln_x: GroupNorm over each head's channels, weight and bias [d / tp] split with the heads
        self.ln_x = nn.Module()
        self.ln_x.weight = declare(nn.Parameter(torch.empty(self.heads_local * head_size)), init=ones, split_dim=0)
        self.ln_x.bias = declare(nn.Parameter(torch.empty(self.heads_local * head_size)), init=zeros, split_dim=0)

    def _inputs(self, x: torch.Tensor, prev: torch.Tensor):
        """ddlerp and the projections: ``(r, k, v, g, log w)``, each ``[..., d / tp]``."""
        dx = prev - x
        lora = torch.tanh((x + dx * self.time_maa_x) @ self.time_maa_w1).unflatten(-1, (len(MIXED), self.mix_lora))
        mixes = torch.einsum("...fl,fld->f...d", lora, self.time_maa_w2)  # [5, ..., d]
        xw, xk, xv, xr, xg = (x + dx * (getattr(self, f"time_maa_{name}") + m) for name, m in zip(MIXED, mixes))
        log_w = -torch.exp(at_least_fp32(self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2))
        return self.receptance(xr), self.key(xk), self.value(xv), F.silu(self.gate(xg)), log_w

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return at_least_fp32(t).unflatten(-1, (self.heads_local, self.head_size))

    def _out(self, o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``W_o (GroupNorm(o) * g)``; ``o [..., h, n]``."""
        flat = o.flatten(0, -3).flatten(-2)  # [tokens, h n]
        normed = F.group_norm(flat, self.heads_local, self.ln_x.weight.to(flat.dtype), self.ln_x.bias.to(flat.dtype),
                              self.group_norm_eps)
        return self.output(normed.view(*o.shape[:-2], -1).to(g.dtype) * g)

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:  # [s, b, d] -> [s, b, d]
        return self._mix(x, docs)[0]

    def _mix(self, x: torch.Tensor, docs=None):
        """(the output, and per head ``k``, ``v``, ``log w [s, b, h, n]``)."""
        r, k, v, g, log_w = self._inputs(x, token_shift(x, docs, self.dims))
        reset = None if docs is None else docs.starts
        k, v, log_w = self._heads(k), self._heads(v), log_w.unflatten(-1, (self.heads_local, -1))
        o = wkv(self._heads(r), k, v, log_w, at_least_fp32(self.time_faaaa), self.chunk, reset, self.dims,
                self.kernels)
        return self._out(o, g), k, v, log_w

    def prefill(self, x: torch.Tensor, max_len: int):  # x: [s, b, d] -> (out, state)
        """The prompt in one pass; the state: the last input (token shift) and
        ``S_T = sum_s diag(w_{s+1} ... w_T) k_s^T v_s``."""
        out, k, v, log_w = self._mix(x)
        wkv_state = torch.einsum("sbhn,sbhm->bhnm", k * torch.exp(log_decay_after(log_w)), v)
        return out, {"shift": x[-1].clone(), "wkv": wkv_state}

    def init_state(self, batch: int, max_len: int):
        w = self.receptance.weight
        return {
            "shift": torch.zeros(batch, w.shape[1], device=w.device, dtype=w.dtype),
            "wkv": torch.zeros(batch, self.heads_local, self.head_size, self.head_size, device=w.device,
                               dtype=torch.promote_types(w.dtype, torch.float32)),
        }

    def step(self, x: torch.Tensor, state, pos: int) -> torch.Tensor:  # x: [1, b, d]
        r, k, v, g, log_w = self._inputs(x[0], state["shift"])
        state["shift"] = x[0]
        o, state["wkv"] = wkv_step(self._heads(r), self._heads(k), self._heads(v),
                                   torch.exp(log_w).unflatten(-1, (self.heads_local, -1)),
                                   at_least_fp32(self.time_faaaa), state["wkv"])
        return self._out(o, g).unsqueeze(0)


def build(c: RWKVConfig, b: Build) -> TimeMix:
    return TimeMix(c.d_model, c.rwkv_head_size, mix_lora=c.rwkv_mix_lora, decay_lora=c.rwkv_decay_lora,
                   group_norm_eps=c.rwkv_group_norm_eps, chunk=c.rwkv_chunk, init_std=b.init_std, out_std=b.out_std,
                   dims=b.dims, kernels=c.kernels)


def check_tensor_parallel(c: RWKVConfig, tp: int) -> str | None:
    """Heads split over ranks."""
    return divisibility(tp, {"the RWKV heads (model.d_model / model.rwkv_head_size)": c.heads})


def flops_per_token(c: RWKVConfig, seq_len: int) -> dict[str, float]:
    """``W_r``, ``W_k``, ``W_v``, ``W_g``, ``W_o`` and the two LoRAs (token shift: ``[d, 5 L]``, ``[5, L, d]``;
    decay: ``D_1``, ``D_2``), 2 per weight; the chunked WKV (``wkv``'s steps, chunk ``q = min(rwkv_chunk, s)``), per
    token and head of ``N`` channels: 1. the scores ``r_t . k_s`` against the chunk's ``q`` keys and the weighted
    values (``2 q N`` each); 2. the chunk's state ``k^T v`` (``2 N^2``); 3. state passing (``2 N^2 / q``); 4. the
    entering state's read-out ``r S`` (``2 N^2``). Decays, the bonus and the group norm are pointwise."""
    d, n, mix, decay = c.d_model, c.rwkv_head_size, c.rwkv_mix_lora, c.rwkv_decay_lora
    q = min(c.rwkv_chunk, seq_len)
    return {"projections": 2.0 * 5 * d * d,
            "loras": 2.0 * (d * len(MIXED) * mix + len(MIXED) * mix * d + d * decay + decay * d),
            "wkv chunk products": c.heads * 4.0 * q * n,
            "wkv states": c.heads * (2.0 * n * n + 2.0 * n * n / q + 2.0 * n * n)}


SPECS = (SublayerSpec("W", "RWKV-6 (Finch) time mix", RWKVConfig, build, check_tensor_parallel,
                      lambda c: ContextParallel("state"), flops_per_token=flops_per_token),)
