"""Causal multi-query / grouped-query attention with RoPE, global or over a sliding window.

Symbols ``*`` (global) and ``L`` (local, Griffin Sec. 2.4: each position attends to the previous
``window`` positions including itself)::

    q_h = RoPE(W_q^h x),  k_g = RoPE(W_k^g x),  v_g = W_v^g x         # g = kv group of head h
    o_h = softmax(q_h k_g^T / sqrt(d_head) + M) v_g,   M_ts = 0 if t - window < s <= t else -inf
    out = W_o [o_1; ...; o_H]

RoPE (Su et al., arXiv 2104.09864) rotates the first ``rope_fraction`` of each head's dims, pair ``i`` at the
frequency ``theta_i = base^(-2i / rot)``. Context extension rescales those frequencies (``rope_scaling``):

    linear:  theta_i / factor                                   (position interpolation, arXiv 2306.15595)
    llama3:  with wavelength lambda_i = 2 pi / theta_i and the original context C = rope_original_max_positions,
             theta_i                          where lambda_i < C / high_freq_factor   (high frequencies kept)
             theta_i / factor                 where lambda_i > C / low_freq_factor    (low frequencies scaled)
             (1 - a) theta_i / factor + a theta_i,  a = (C / lambda_i - low) / (high - low),  in between
``scale`` replaces ``1 / sqrt(d_head)`` where a model sets its own (Granite's
``attention_multiplier``); ``qkv_bias`` adds biases to ``W_q``, ``W_k``, ``W_v`` (``out_bias`` to ``W_o``).
``in_features`` is the input width when it is not ``d_model`` (Zamba's shared block reads
``concat(h, embeddings)``, ``2 d_model``); a use of a shared block may pass per-use LoRA adapters
(``lora = {"q": ..., "k": ..., "v": ...}``, ``chimera.models.lora``) added to ``W_q x``, ``W_k x``, ``W_v x``.

TP: query heads split over ranks (``W_q`` column parallel, ``W_o`` row parallel). Key/value heads
split too when TP divides their number; otherwise (MQA: one kv head) every rank holds all kv
heads and their projection's gradient, partial per rank, is summed over TP.

Over a sequence at least three windows long, local attention runs in blocks of queries, each against the keys its
window reaches (``sliding_window_attention``): work ``O(s window)``, not the dense mask's ``O(s^2)`` (shorter, the
dense mask is faster: ``blocks_pay``).
Over packed documents a token sees no further back than its document's start, so attention within documents is a
sliding window of the longest document's reach (``PackedDocuments.reach``) and runs in the same blocks where that
pays (``blocks_pay``); one document per row without context parallelism passes no mask at all (SDPA's
``is_causal``). The dense mask remains for the rest: long documents, an offset chunk under CP, subclasses' own
patterns (BigBird), decoding and exported graphs.

Decoding keeps keys/values in a ring buffer of ``window`` slots (local) or ``max_len`` slots
(global): memory is bounded by the window for local attention. Prefill computes the prompt's keys and values
once, attends with the mask ``M``, and writes the last ``slots`` of them into their ring-buffer slots.

Context parallelism (``chimera.parallel.context``; a rank holds one chunk of the sequence): queries stay
on their rank, keys and values come from the chunks they may see. Global attention gathers every
chunk's keys and values (an all-gather; causal masking by sequence position hides the later ones);
local attention receives only the ``window - 1`` positions before its chunk (a halo from the rank(s)
before). Keys get RoPE on the rank that computes them, at their own positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from chimera.models.ops import dispatch
from chimera.models.spec import Build, ContextParallel, SublayerConfig, SublayerSpec, divisibility
from chimera.parallel.context import chunk_start, gather_sequence, halo
from chimera.parallel.dims import ParallelDims
from chimera.parallel.layers import ColumnParallel, RowParallel
from chimera.parallel.sharding import declare, normal, zeros


class AttentionConfig(SublayerConfig):
    """The ``model:`` fields attention reads (global ``*``; local ``L`` adds ``window``)."""

    num_heads: int = Field(1, ge=1)
    num_kv_heads: int = Field(1, ge=1)
    head_dim: int | None = Field(None, ge=1, description="resolved: d_model / num_heads")
    rope_base: float = Field(10000.0, gt=0)
    rope_fraction: float = Field(1.0, ge=0, le=1.0, description="fraction of head dims rotated by RoPE (0: no RoPE)")
    rope_scaling: Literal["none", "linear", "llama3"] = Field("none", description="RoPE frequency rescaling")
    rope_factor: float = Field(1.0, gt=0, description="rope_scaling: how much longer the context is made")
    rope_low_freq_factor: float = Field(1.0, gt=0, description="llama3 scaling: the low-frequency bound")
    rope_high_freq_factor: float = Field(4.0, gt=0, description="llama3 scaling: the high-frequency bound")
    rope_original_max_positions: int = Field(8192, ge=1, description="llama3 scaling: the original context")
    attention_scale: float | None = Field(
        None, gt=0, description="softmax scale of attention scores (None: 1 / sqrt(head_dim))"
    )
    attention_bias: bool = Field(False, description="biases on the q, k, v and o projections of attention")
    linear_bias: bool = Field(False, description="biases on recurrent-block, attention-output and MLP projections")

    @model_validator(mode="after")
    def _resolve(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model} (or set head_dim)")
            self.head_dim = self.d_model // self.num_heads
        return self


class LocalAttentionConfig(AttentionConfig):
    window: int = Field(1024, ge=1, description="sliding window of local attention (symbol L)")


@dataclass(frozen=True)
class Rope:
    """RoPE's frequencies: ``rot_dim`` rotated dims, ``base``, and the rescaling (see the module's docstring)."""

    rot_dim: int
    base: float
    scaling: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    def frequencies(self, device=None) -> torch.Tensor:
        """``theta_i`` of the ``rot_dim / 2`` pairs, rescaled: ``[rot/2]``, fp32."""
        theta = 1.0 / (self.base ** (torch.arange(0, self.rot_dim, 2, dtype=torch.float32, device=device)
                                     / self.rot_dim))
        if self.scaling == "linear":
            return theta / self.factor
        if self.scaling == "llama3":
            wavelength = 2 * math.pi / theta
            context, low, high = self.original_max_positions, self.low_freq_factor, self.high_freq_factor
            blend = ((context / wavelength - low) / (high - low)).clamp(0, 1)  # 0: scaled, 1: kept
            return (1 - blend) * theta / self.factor + blend * theta
        return theta

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of ``positions [s]`` (or ``[b, 1, s]``) times the frequencies: ``[..., s, rot/2]``."""
        angles = positions.float().unsqueeze(-1) * self.frequencies(positions.device)
        return angles.cos(), angles.sin()


def rope_of(c: AttentionConfig) -> Rope:
    """The RoPE of an attention config."""
    return Rope(int(c.head_dim * c.rope_fraction) // 2 * 2, c.rope_base, c.rope_scaling, c.rope_factor,
                c.rope_low_freq_factor, c.rope_high_freq_factor, c.rope_original_max_positions)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i + rot/2}) of the first ``rot`` dims; ``x`` is [b, h, s, d], tables [s, rot/2] (or
    [b, 1, s, rot/2]); its Triton kernel: ``chimera.models.ops.rope``."""
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot].float(), x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, x_pass], dim=-1)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, *,
                             key_ok: torch.Tensor | None = None, q_seg: torch.Tensor | None = None,
                             k_seg: torch.Tensor | None = None, scale: float | None = None,
                             block: int | None = None) -> torch.Tensor:
    """Local attention in blocks, never forming the dense ``[s, s_k]`` mask or scores: ``q [b, h, s, d]`` at ``s``
    consecutive positions; ``k, v [b, h, s_k, d]``, the ``n = s_k - s`` positions before the queries (a CP halo; any
    ``n >= 0``) then the queries' own; query ``t`` sees key ``u`` iff ``t - window < u <= t`` (the mask ``M``), and,
    where given, ``key_ok [s_k]`` (False: no such position, e.g. before the sequence) and its document
    ``q_seg [b, s] == k_seg [b, s_k]``. Equal to ``softmax(q k^T scale + M) v`` with the dense mask.

    Queries go in blocks of ``B = block`` (default ``min(window, s)``); block ``i`` reads the ``B + window - 1`` keys
    ending at its last query's own: ``s (B + window - 1)`` scores instead of ``s s_k``. In a block, query ``r`` and key
    ``c`` are ``window - 1 + r - c`` positions apart, the same for every block: the band mask is one ``[B, B + w - 1]``
    table. Padding (keys before the first block's window, queries after the last) is masked; a padded query sees its
    own padded key, so that no row of the softmax is empty (a NaN there would reach the keys' gradients)."""
    b, h, s, d = q.shape
    w = window
    drop = max(0, k.shape[2] - s - (w - 1))  # keys no query can see
    k, v = k[:, :, drop:], v[:, :, drop:]
    n = k.shape[2] - s  # keys before the first query, now < window
    B = min(block or w, s)
    nq = -(-s // B)  # query blocks
    span = B + w - 1  # keys a block reads
    front, back = w - 1 - n, nq * B - s  # padded: keys (so block i reads keys i B .. i B + span - 1), queries

    def blocks_of_keys(t: torch.Tensor, fill, dim: int, size: int = span) -> torch.Tensor:
        pad = [0, 0] * (t.dim() - 1 - dim) + [front, back]
        return F.pad(t, pad, value=fill).unfold(dim, size, B)  # [..., nq, ..., size] (the blocks' axis at dim)

    q_blocks = F.pad(q, (0, 0, 0, back)).unflatten(2, (nq, B)).transpose(1, 2)  # [b, nq, h, B, d]
    k_blocks = blocks_of_keys(k, 0.0, 2).permute(0, 2, 1, 4, 3)  # [b, nq, h, span, d]
    v_blocks = blocks_of_keys(v, 0.0, 2).permute(0, 2, 1, 4, 3)
    r = torch.arange(B, device=q.device)[:, None]
    c = torch.arange(span, device=q.device)[None, :]
    allowed = ((c >= r) & (c < r + w))[None, None]  # [1, 1, B, span]: 0 <= (w - 1 + r - c) < w
    ok = torch.ones(k.shape[2], dtype=torch.bool, device=q.device) if key_ok is None else key_ok[drop:]
    ok = F.pad(F.pad(ok, (0, back), value=True), (front, 0), value=False)  # padded queries' own keys: True
    allowed = allowed & ok.unfold(0, span, B)[None, :, None, :]  # [1, nq, B, span]
    if q_seg is not None:
        q_blocks_seg = F.pad(q_seg, (0, back), value=-1).unflatten(1, (nq, B))  # [b, nq, B]
        k_blocks_seg = blocks_of_keys(k_seg[:, drop:], -1, 1)  # [b, nq, span]
        allowed = allowed & (q_blocks_seg[..., :, None] == k_blocks_seg[..., None, :])
    allowed = allowed.expand(b, nq, B, span).reshape(b * nq, 1, B, span)
    o = F.scaled_dot_product_attention(q_blocks.reshape(b * nq, h, B, d), k_blocks.reshape(b * nq, h, span, d),
                                       v_blocks.reshape(b * nq, h, span, d), attn_mask=allowed, scale=scale)
    return o.unflatten(0, (b, nq)).transpose(1, 2).flatten(2, 3)[:, :, :s]  # [b, h, s, d]


def blocks_pay(band: int, keys: int) -> bool:
    """Whether attention over ``keys`` keys within a band of ``band`` positions is faster in blocks
    (``sliding_window_attention``, a block of ``band`` queries reads ``2 band - 1`` keys) than with the dense mask:
    where the keys are at least three bands. ``benchmarks/sliding_window.py --document-length 1024`` (CPU,
    forward + backward): blocks/dense 0.86x at 2 bands, 1.63x at 3, 1.94x at 4, 9.1x at 16; a local window of 128
    (``--window 128 --heads 4 --batch 8``): 0.71x at 2 windows, 0.93x at 3, 1.19x at 4, 1.67x at 6."""
    return 3 * band <= keys


class Attention(nn.Module):
    ROW_POSITIONS = True  # step takes each row's position (chimera.models.positions)

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *, window: int | None,
                 rope: Rope, init_std: float, out_std: float, dims: ParallelDims,
                 out_bias: bool = False, qkv_bias: bool = False, scale: float | None = None,
                 in_features: int | None = None, kernels: str = "auto"):
        """``kernels``: ``model.kernels``, for RoPE (``chimera.models.ops.dispatch``)."""
        super().__init__()
        d_in = in_features or d_model
        self.dims = dims
        self.head_dim, self.window, self.scale = head_dim, window, scale
        self.heads_local = dims.local(num_heads, "num_heads")
        self.rope, self.kernels = rope, kernels
        group = num_heads // num_kv_heads  # query heads per kv head
        # W_q [H / tp * d_head, d_in]: split along dim 0, by head
        self.q_proj = ColumnParallel(d_in, num_heads * head_dim, dims, init=normal(init_std), bias=qkv_bias)
        self.kv_split = num_kv_heads % dims.tp == 0
        if self.kv_split:  # W_k, W_v [KV / tp * d_head, d_in]: split along dim 0, with their query heads
            self.k_proj = ColumnParallel(d_in, num_kv_heads * head_dim, dims, init=normal(init_std), bias=qkv_bias)
            self.v_proj = ColumnParallel(d_in, num_kv_heads * head_dim, dims, init=normal(init_std), bias=qkv_bias)
            first_kv = dims.tp_rank * num_kv_heads // dims.tp
        else:  # fewer kv heads than ranks: W_k, W_v replicated (all kv heads on every rank), gradient partial
            self.k_proj = nn.Linear(d_in, num_kv_heads * head_dim, bias=qkv_bias)
            self.v_proj = nn.Linear(d_in, num_kv_heads * head_dim, bias=qkv_bias)
            for proj in (self.k_proj, self.v_proj):
                declare(proj.weight, init=normal(init_std), partial_grad_over_tp=dims.tp > 1)
                if qkv_bias:
                    declare(proj.bias, init=zeros, partial_grad_over_tp=dims.tp > 1)
            first_kv = 0
        # the kv head each local query head reads: an index from the layout, on the CPU even on a meta build
        global_heads = torch.arange(self.heads_local, device="cpu") + dims.tp_rank * self.heads_local
        self.register_buffer("kv_of_head", global_heads // group - first_kv, persistent=False)
        self.kv_heads_read = self._kv_heads_read(self.kv_of_head)
        # W_o [d_model, H / tp * d_head]: split along dim 1; output all-reduced (or reduce-scattered)
        self.o_proj = RowParallel(num_heads * head_dim, d_model, dims, init=normal(out_std), bias=out_bias)

    def _project(self, x: torch.Tensor, positions: torch.Tensor, lora=None):
        """``x [s, b, d]`` -> q, k, v as ``[b, heads, s, d_head]`` with RoPE applied to q and k."""
        def heads(t):
            return t.unflatten(-1, (-1, self.head_dim)).permute(1, 2, 0, 3)

        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if lora is not None:
            q, k, v = (t + lora[name](x)[0] for t, name in ((q, "q"), (k, "k"), (v, "v")))
        q, k, v = heads(q), heads(k), heads(v)
        cos, sin = self.rope.tables(positions)
        return (dispatch.apply_rope(q, cos, sin, kernels=self.kernels),
                dispatch.apply_rope(k, cos, sin, kernels=self.kernels), v)

    @staticmethod
    def _kv_heads_read(kv_of_head: torch.Tensor) -> slice | None:
        """The kv heads the local query heads read, as a slice, where each reads them in equal consecutive groups
        (SDPA's grouped-query layout); None where a rank's heads straddle their groups unevenly (replicated kv heads
        under TP)."""
        first, n = int(kv_of_head[0]), int(kv_of_head[-1] - kv_of_head[0]) + 1
        heads = kv_of_head.shape[0]
        regular = heads % n == 0 and torch.equal(kv_of_head, first + torch.arange(heads, device="cpu") // (heads // n))
        return slice(first, first + n) if regular else None

    def _attend(self, q, k, v, allowed: torch.Tensor | None) -> torch.Tensor:
        """Attention of local query heads over their kv heads; ``allowed`` [s_q, s_k] is True where visible, or None:
        causal over the queries' own positions (SDPA's ``is_causal``, no mask formed). Grouped heads go to SDPA as
        they are (``enable_gqa``: no copy of the keys per query head, and none of its gradient to sum back: 10-25%
        off forward + backward on CPU at RecurrentGemma's one kv head); an exported graph copies them."""
        read, gqa = self.kv_heads_read, False
        if read is None or torch.compiler.is_exporting():
            k, v = k[:, self.kv_of_head], v[:, self.kv_of_head]
        else:
            k, v, gqa = k[:, read], v[:, read], read.stop - read.start < q.shape[1]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=allowed is None,
                                           scale=self.scale, enable_gqa=gqa)  # scale None: 1/sqrt(d_head)
        return o.permute(2, 0, 1, 3).flatten(-2)  # [s, b, heads * d_head]

    def _band(self, s: int, s_k: int, reach: int | None = None) -> int | None:
        """The window ``sliding_window_attention`` runs this layer's mask with, in blocks, for ``s`` queries over
        ``s_k`` keys; None: the dense mask ``visible`` builds (a subclass's own pattern, or an exported graph).

        Local attention runs in blocks where that pays (``blocks_pay``: keys at least three windows). Over packed
        documents no token looks further back than its document's start, ``reach`` positions at most
        (``PackedDocuments.reach``): causal attention within documents *is* a sliding window of ``reach``: the band is
        the shorter of the two windows, and it runs in blocks where that pays too."""
        windows = [w for w in (self.window, reach) if w is not None]
        if not windows or type(self).visible is not Attention.visible or torch.compiler.is_exporting():
            return None
        band = min(windows)
        return band if blocks_pay(band, s_k) else None

    def _only_causal(self, s: int, s_k: int) -> bool:
        """Whether the mask is causality alone, ``s`` queries over their own ``s_k = s`` keys (global attention, one
        document per row, no context parallelism): SDPA's ``is_causal`` then, with no ``[s, s]`` mask (CPU, forward +
        backward: ``benchmarks/sliding_window.py --causal``)."""
        return (self.window is None and s == s_k and type(self).visible is Attention.visible
                and not torch.compiler.is_exporting())

    def _attend_window(self, q, k, v, band: int, key_ok=None, q_seg=None, k_seg=None) -> torch.Tensor:
        """``_attend`` with the mask of a sliding window of ``band`` positions, in blocks
        (``sliding_window_attention``)."""
        o = sliding_window_attention(q, k[:, self.kv_of_head], v[:, self.kv_of_head], band, key_ok=key_ok,
                                     q_seg=q_seg, k_seg=k_seg, scale=self.scale)
        return o.permute(2, 0, 1, 3).flatten(-2)

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor, bound: int | None = None) -> torch.Tensor:
        """The mask M: key s visible from query t iff t - window < s <= t (and s is a position, s >= 0).
        ``bound``: a length every position stays below, where decoding knows one (its cache's ``max_len``); a
        pattern built per block (BigBird's) sizes its table by it, so that a traced graph's table is static."""
        diff = q_pos[:, None] - k_pos[None, :]
        allowed = (diff >= 0) & (k_pos >= 0)[None, :]
        if self.window is not None:
            allowed &= diff < self.window
        return allowed

    def forward(self, x: torch.Tensor, docs=None, lora=None) -> torch.Tensor:  # [s, b, d] -> [s, b, d]
        """``docs``: packed documents; a token then sees only its own document, at in-document positions."""
        start = chunk_start(x.shape[0], self.dims)
        pos = start + torch.arange(x.shape[0], device=x.device)  # sequence positions
        q, k, v = self._project(x, pos if docs is None else docs.position_ids.t().unsqueeze(1), lora)  # RoPE
        k, v, k_pos = self._keys_values(k, v, pos)
        q_seg = k_seg = None
        if docs is not None:  # a token sees only its own document
            q_seg = docs.segment_ids.t()  # [b, s]
            k_seg = docs.all_segment_ids.index_select(0, k_pos.clamp(min=0)).t()  # [b, s_k] (k_pos < 0: masked)
        seen = k.shape[2] if self.window is not None else start + x.shape[0]  # global under CP: not later chunks'
        band = self._band(x.shape[0], seen, None if docs is None else docs.reach)
        if band is not None:
            return self.o_proj(self._attend_window(q, k[:, :, :seen], v[:, :, :seen], band, k_pos[:seen] >= 0,
                                                   q_seg, None if k_seg is None else k_seg[:, :seen]))
        if docs is None and self._only_causal(x.shape[0], k.shape[2]):
            return self.o_proj(self._attend(q, k, v, None))
        allowed = self.visible(pos, k_pos)  # [s, s_k]
        if docs is not None:
            allowed = (allowed & (q_seg[:, :, None] == k_seg[:, None, :])).unsqueeze(1)
        return self.o_proj(self._attend(q, k, v, allowed))

    def _keys_values(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """The keys and values ``[b, heads, s_k, d]`` this rank's queries (at sequence positions ``pos``) may see,
        and their positions ``[s_k]``: without context parallelism this chunk's own; under it, every chunk's (global
        attention) or the ``window - 1`` positions before this chunk, then its own (local attention)."""
        dims = self.dims
        if dims.cp == 1:
            return k, v, pos
        if self.window is None:
            k_pos = torch.arange(pos.shape[0] * dims.cp, device=pos.device)
            return gather_sequence(k, dims, dim=2), gather_sequence(v, dims, dim=2), k_pos
        n = self.window - 1
        k_pos = torch.cat([pos[0] - n + torch.arange(n, device=pos.device), pos])
        return torch.cat([halo(k, n, dims, dim=2), k], 2), torch.cat([halo(v, n, dims, dim=2), v], 2), k_pos

    def init_state(self, batch: int, max_len: int):
        slots = min(self.window, max_len) if self.window is not None else max_len
        w = self.q_proj.weight
        kv_heads = self.k_proj.weight.shape[0] // self.head_dim  # kv heads held on this rank
        shape = (batch, kv_heads, slots, self.head_dim)
        return {
            "k": torch.zeros(shape, device=w.device, dtype=w.dtype),
            "v": torch.zeros(shape, device=w.device, dtype=w.dtype),
            # the position each row's slot holds (-1: none yet)
            "pos": torch.full((batch, slots), -1, dtype=torch.long, device=w.device),
        }

    def prefill(self, x: torch.Tensor, max_len: int, lora=None):  # x: [s, b, d] -> (out, state)
        """The prompt in one pass (``visible`` is the mask: global, the window (in blocks where that pays),
        or a subclass's pattern), and the cache ``step`` would hold after it: the positions
        ``s - slots .. s - 1`` at ``position % slots``."""
        s, b = x.shape[:2]
        pos = torch.arange(s, device=x.device)
        q, k, v = self._project(x, pos, lora)
        band = self._band(s, s)
        if band is not None:
            out = self.o_proj(self._attend_window(q, k, v, band))
        elif self._only_causal(s, s):
            out = self.o_proj(self._attend(q, k, v, None))
        else:
            out = self.o_proj(self._attend(q, k, v, self.visible(pos, pos, max_len)))
        state = self.init_state(b, max_len)
        kept = pos[max(0, s - state["pos"].shape[1]):]  # what the ring buffer still holds
        slot = kept % state["pos"].shape[1]
        state["k"][:, :, slot], state["v"][:, :, slot] = k[:, :, kept], v[:, :, kept]
        state["pos"][:, slot] = kept
        return out, state

    def step(self, x: torch.Tensor, state, pos: int | torch.Tensor, lora=None) -> torch.Tensor:  # x: [1, b, d]
        """One token per row at ``pos``: one position for the batch, or each row's own (``LongTensor [b]``)."""
        if isinstance(pos, torch.Tensor):
            return self._step_rows(x, state, pos, lora)
        q, k, v = self._project(x, torch.tensor([pos], device=x.device), lora)
        slot = pos % state["pos"].shape[1]  # ring buffer: overwrite the oldest position
        state["k"][:, :, slot], state["v"][:, :, slot] = k[:, :, 0], v[:, :, 0]
        state["pos"][:, slot] = pos
        held = state["pos"][0]  # rows at one position hold the same positions
        allowed = self.visible(torch.tensor([pos], device=x.device), held, self._bound(held)) & (held >= 0)
        return self.o_proj(self._attend(q, state["k"], state["v"], allowed))

    def _bound(self, held: torch.Tensor) -> int | None:
        """The cache's length where every position stays below it: the global cache of ``max_len`` slots (a ring
        buffer's slots are reused by later positions)."""
        return held.shape[-1] if self.window is None else None

    def _step_rows(self, x: torch.Tensor, state, pos: torch.Tensor, lora=None) -> torch.Tensor:
        """``step`` with row ``i`` at ``pos[i]``: RoPE at each row's position, its slot, its mask."""
        rows = torch.arange(x.shape[1], device=x.device)
        q, k, v = self._project(x, pos[:, None, None], lora)  # tables [b, 1, 1, rot / 2]
        slot = pos % state["pos"].shape[1]
        state["k"][rows, :, slot], state["v"][rows, :, slot] = k[:, :, 0], v[:, :, 0]
        state["pos"][rows, slot] = pos
        held = state["pos"]
        bound = self._bound(held)
        allowed = torch.stack([self.visible(pos[i: i + 1], held[i], bound) for i in range(len(rows))])
        allowed = allowed & (held >= 0)[:, None]
        return self.o_proj(self._attend(q, state["k"], state["v"], allowed[:, None]))  # mask [b, 1, 1, slots]


def _build(local: bool):
    def build(c: AttentionConfig, b: Build) -> Attention:
        return Attention(c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, window=c.window if local else None,
                         rope=rope_of(c), init_std=b.init_std,
                         out_std=b.out_std, dims=b.dims, out_bias=c.linear_bias or c.attention_bias,
                         qkv_bias=c.attention_bias, scale=c.attention_scale, kernels=c.kernels)
    return build


def check_tensor_parallel(c: AttentionConfig, tp: int) -> str | None:
    """Query heads split over ranks; kv heads split too, or (fewer than ranks) are replicated."""
    kv_neither = c.num_kv_heads % tp and tp % c.num_kv_heads
    return divisibility(tp, {"model.num_heads": c.num_heads}) or (
        f"parallel.tensor={tp} and model.num_kv_heads={c.num_kv_heads}: one must divide the other" if kv_neither
        else None)


def keys_seen(seq_len: int, window: int | None) -> float:
    """The keys a causal query sees, on average over a sequence of ``seq_len``: ``t`` at position ``t``
    (1-based), at most ``window`` of them."""
    if window is None or seq_len <= window:
        return (seq_len + 1) / 2
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def projection_flops(c: AttentionConfig, in_features: int | None = None) -> float:
    """``W_q``, ``W_k``, ``W_v`` (from ``in_features``, default ``d_model``) and ``W_o``: 2 per weight."""
    d_in = in_features or c.d_model
    return 2.0 * (d_in * c.head_dim * (c.num_heads + 2 * c.num_kv_heads) + c.num_heads * c.head_dim * c.d_model)


def score_flops(c: AttentionConfig, keys: float) -> float:
    """``q k^T`` and the weighted values ``p v``: 2 x 2 x keys x head_dim per query head."""
    return 4.0 * keys * c.num_heads * c.head_dim


def _flops_per_token(local: bool):
    def flops(c: AttentionConfig, seq_len: int) -> dict[str, float]:
        keys = keys_seen(seq_len, c.window if local else None)
        return {"projections": projection_flops(c), "scores": score_flops(c, keys)}
    return flops


SPECS = (
    SublayerSpec("*", "global causal attention", AttentionConfig, _build(local=False), check_tensor_parallel,
                 lambda c: ContextParallel("keys_values"), flops_per_token=_flops_per_token(local=False)),
    SublayerSpec("L", "local sliding-window attention", LocalAttentionConfig, _build(local=True),
                 check_tensor_parallel, lambda c: ContextParallel("halo", halo=c.window - 1),
                 flops_per_token=_flops_per_token(local=True)),
)
