"""GOLD attention over one compressed key cache: the upper layers of GoldFinch (Goldstein et al., arXiv 2407.12077),
symbol ``G``.

GoldFinch stacks GOLD layers (with RWKV channel mixes) on Finch (RWKV-6) layers. No GOLD layer keeps keys or values
of its own: one cache is made once per pass, where the first GOLD layer reads the residual stream ``x`` (the
output of the last Finch layer), and every GOLD layer derives its keys and values from it ("TokenCat", Sec. 3)::

    c_t   = W_a x_t                                      # the compressed key, d / 16 wide: what is cached
    kc_t  = RMSNorm(W_b [e_t ; c_t])                     # decompressed with the token's input embedding e_t
    xo_t  = RMSNorm(e_t)                                 # values come from the embeddings: only token ids cached

so a decoding cache holds ``d / 16`` numbers and one token id per position for the whole model, against a
transformer's ``2 x layers x d``. Each GOLD layer then, with the token shift of RWKV (``shift(y)_t = y_{t-1}``,
zeros before a sequence or document start) and LoRA-mixed interpolation as in Finch::

    q_t   = LN_q(W_q (h_t + (h_{t-1} - h_t) (maa_q + tanh((h_t + (h_{t-1} - h_t) maa_x) Q_1) Q_2)))
    m^k, m^v = tanh((xo + (shift(xo) - xo) maa_v_cache) M_1) M_2        # one LoRA, two outputs
    k     = kc + (shift(kc) - kc) (maa_k + m^k),   k = LN_k(k + tanh(k K_1) K_2)
    v     = xo + (shift(xo) - xo) (maa_v + m^v),   v = LN_v(v + tanh(v V_1) V_2)
    out   = W_o LN_x(softmax(q k^T / sqrt(N) + causal mask) v)          # per head of N channels, no RoPE

This follows the authors' code (recursal/GoldFinch-paper, ``tmix/tmix_gold.py`` and ``src/model.py``: the names
``time_maa_*``, ``time_maa_q_w1/w2``, ``time_maa_kv_w1/w2``, ``time_key_w1/w2``, ``time_value_w1/w2``, ``ln_q``,
``ln_k``, ``ln_v``, ``ln_x``; ``compress`` / ``decompress`` are its model-level ``w_kv_cache_a`` / ``w_kv_cache_b``,
held here by the first GOLD layer, which builds the cache). GoldFinch's default uses no positional encoding in
GOLD layers (its RoPE is an ablation). The pass's cache is published in the ``Context``
(``chimera.models.sublayer``) for the later GOLD layers; decoding keeps the compressed keys and the token ids in
the first GOLD layer's state and re-embeds the ids (``Context.embed``).

Tensor parallelism splits heads: ``W_q`` column parallel, ``W_o`` row parallel, ``LN_q`` and ``LN_x`` (LayerNorms
over all heads' channels) split with the heads, their mean and variance summed over TP. The key and value path
reads the whole ``d``-wide cache, so every rank computes it whole and keeps its heads: those weights (and the
cache's ``W_a``, ``W_b``) are held whole on every rank, each rank's gradient for them partial, summed over TP.

Context parallelism (``keys_values``): the compressed keys and the embeddings of every position are gathered from
all ranks (``chimera.parallel.context.gather_sequence``); every rank decompresses the whole sequence and its queries
attend to the positions up to theirs. Pipeline parallelism is refused: stages do not carry the published cache.
The attention itself is ``chimera.models.mixers.attention``'s: in blocks of the documents' reach over packed
documents where that pays, SDPA's ``is_causal`` for one document per row without CP, else the dense mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from chimera.models.mixers.attention import blocks_pay, sliding_window_attention
from chimera.models.mixers.rwkv6 import RWKVConfig, _ramp, replicated, small_uniform, token_shift
from chimera.models.norms import LayerNorm
from chimera.models.numerics import at_least_fp32
from chimera.models.spec import Build, ContextParallel, SublayerSpec, divisibility
from chimera.parallel.context import chunk_start, gather_sequence
from chimera.parallel.dims import ParallelDims
from chimera.parallel.layers import ColumnParallel, RowParallel, enter_tensor_parallel, sum_over_tensor_parallel
from chimera.parallel.sharding import declare, normal, ones, zeros

PUBLISHED = "gold.cache"  # Context.published key: (decompressed keys kc, values' source xo), [S, b, d] each


class GoldConfig(RWKVConfig):
    """The ``model:`` fields of GOLD attention (symbol ``G``); heads and mixing LoRA as RWKV-6's."""

    gold_compression: int = Field(16, ge=1, description="GOLD: the compressed key cache is d_model / this wide")
    gold_value_lora: int | None = Field(None, ge=1, description="GOLD: rank of the key and value LoRAs "
                                        "(resolved: max(d_model / 16, 64))")

    @model_validator(mode="after")
    def _resolve(self):
        if self.d_model % self.gold_compression:
            raise ValueError(f"gold_compression={self.gold_compression} does not divide d_model={self.d_model}; "
                             "choose a divisor of d_model")
        self.gold_value_lora = self.gold_value_lora or max(self.d_model // 16, 64)
        return self


def rms_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Parameter-free RMSNorm (the authors' ``rms_norm``)."""
    x32 = at_least_fp32(x)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def layer_norm_over_heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, width: int, eps: float,
                          dims: ParallelDims) -> torch.Tensor:
    """LayerNorm over all heads' ``width`` channels of ``x``, which holds this rank's heads: the sums that make the
    mean and variance are summed over TP, so every TP size computes the same function."""
    x32 = at_least_fp32(x)
    mean = sum_over_tensor_parallel(x32.sum(-1, keepdim=True), dims) / width
    var = sum_over_tensor_parallel((x32 - mean).pow(2).sum(-1, keepdim=True), dims) / width
    return ((x32 - mean) * torch.rsqrt(var + eps) * weight + bias).to(x.dtype)


def shift_sequence(y: torch.Tensor, starts: torch.Tensor | None) -> torch.Tensor:
    """``y_{t-1}`` along a whole sequence ``[S, b, d]``: zeros at its start and at documents' first tokens."""
    prev = torch.cat([torch.zeros_like(y[:1]), y[:-1]])
    return prev if starts is None else prev.masked_fill(starts.unsqueeze(-1), 0.0)


class GoldAttention(nn.Module):
    """Symbol ``G``: one GOLD layer over this rank's heads; the first of the pattern also builds the cache."""

    reads_context = True  # called with the pass's Context and the residual stream (chimera.models.sublayer)

    def __init__(self, d_model: int, head_size: int, *, compression: int = 16, mix_lora: int = 32,
                 value_lora: int = 64, eps: float = 1e-5, builds_cache: bool = True, init_std: float,
                 out_std: float, dims: ParallelDims):
        super().__init__()
        self.dims, self.d_model, self.head_size, self.eps, self.mix_lora = dims, d_model, head_size, eps, mix_lora
        self.heads_local = dims.local(d_model // head_size, "GOLD heads (d_model / rwkv_head_size)")
        self.first_channel = dims.tp_rank * self.heads_local * head_size
        self.builds_cache = builds_cache
        partial = dims.tp > 1  # held whole on every rank, used for this rank's heads: partial gradients
        if builds_cache:
            # W_a [d / compression, d], W_b [d, d + d / compression]: whole on every rank
            self.compress = nn.Linear(d_model, d_model // compression, bias=False)
            self.decompress = nn.Linear(d_model + d_model // compression, d_model, bias=False)
            for linear in (self.compress, self.decompress):
                declare(linear.weight, init=normal(init_std), partial_grad_over_tp=partial)
        # queries: token-shift mixing [d] and its LoRA [d, L], [L, d] whole on every rank; W_q [d / tp, d]
        self.time_maa_x = replicated(d_model, _ramp(0.5), dims)
        self.time_maa_q = replicated(d_model, _ramp(0.25), dims)
        self.time_maa_q_w1 = replicated((d_model, mix_lora), zeros, dims)
        self.time_maa_q_w2 = replicated((mix_lora, d_model), small_uniform, dims)
        self.query = ColumnParallel(d_model, d_model, dims, init=normal(init_std))
        # keys and values: every weight whole on every rank (they read the whole cache)
        self.time_maa_v_cache = replicated(d_model, _ramp(0.5), dims)
        self.time_maa_k = replicated(d_model, _ramp(0.5), dims)
        self.time_maa_v = replicated(d_model, _ramp(0.5), dims)
        self.time_maa_kv_w1 = replicated((d_model, 2 * mix_lora), zeros, dims)
        self.time_maa_kv_w2 = replicated((2, mix_lora, d_model), small_uniform, dims)
        self.time_key_w1 = replicated((d_model, value_lora), zeros, dims)
        self.time_key_w2 = replicated((value_lora, d_model), small_uniform, dims)
        self.time_value_w1 = replicated((d_model, value_lora), zeros, dims)
        self.time_value_w2 = replicated((value_lora, d_model), small_uniform, dims)
        self.ln_k = LayerNorm(d_model, eps, sequence_parallel=partial)  # the flag: partial gradients over TP
        self.ln_v = LayerNorm(d_model, eps, sequence_parallel=partial)
        # LN_q, LN_x: weight and bias [d / tp] split with the heads; statistics over all heads
        for name in ("ln_q", "ln_x"):
            norm = nn.Module()
            norm.weight = declare(nn.Parameter(torch.empty(self.heads_local * head_size)), init=ones, split_dim=0)
            norm.bias = declare(nn.Parameter(torch.empty(self.heads_local * head_size)), init=zeros, split_dim=0)
            setattr(self, name, norm)
        self.output = RowParallel(d_model, d_model, dims, init=normal(out_std))  # W_o [d, d / tp]

    # ---- the cache ----------------------------------------------------------------------------------------

    def decompressed(self, embeddings: torch.Tensor, compressed: torch.Tensor):
        """``(kc, xo)`` over a whole sequence from the embeddings ``e`` and the compressed keys ``c``."""
        kc = rms_norm(self.decompress(torch.cat([embeddings, compressed], dim=-1)))
        return kc, rms_norm(embeddings)

    def _cache(self, x: torch.Tensor, context, residual: torch.Tensor | None):
        if not self.builds_cache:
            return context.published[PUBLISHED]
        residual = x if residual is None else residual
        if context is None:  # the mixer alone (a test of its rules): its input stands for the embeddings too
            embeddings = residual
        else:
            embeddings = enter_tensor_parallel(context.embeddings, self.dims, self.dims.sequence_parallel)
        cache = self.decompressed(gather_sequence(embeddings, self.dims), gather_sequence(self.compress(residual),
                                                                                           self.dims))
        if context is not None:
            context.published[PUBLISHED] = cache
        return cache

    # ---- one layer ---------------------------------------------------------------------------------------------

    def _keys_values(self, kc: torch.Tensor, xo: torch.Tensor, starts: torch.Tensor | None):
        """This rank's heads of ``k`` and ``v`` over the whole sequence, ``[b, h, S, n]``."""
        dxo = shift_sequence(xo, starts) - xo
        lora = torch.tanh((xo + dxo * self.time_maa_v_cache) @ self.time_maa_kv_w1).unflatten(-1, (2, self.mix_lora))
        mix_k, mix_v = torch.einsum("...fl,fld->f...d", lora, self.time_maa_kv_w2)
        k = kc + (shift_sequence(kc, starts) - kc) * (self.time_maa_k + mix_k)
        v = xo + dxo * (self.time_maa_v + mix_v)
        k = k + torch.tanh(k @ self.time_key_w1) @ self.time_key_w2
        # LN_k's bias b adds q . b to every score of a query, which the softmax ignores: it is kept (the authors'
        # parameter) but left out of the scores, so its gradient is exactly 0 rather than rounding noise
        k = (F.layer_norm(at_least_fp32(k), k.shape[-1:], self.ln_k.weight.to(at_least_fp32(k).dtype), None,
                          self.eps) + 0.0 * self.ln_k.bias).to(k.dtype)
        v = self.ln_v(v + torch.tanh(v @ self.time_value_w1) @ self.time_value_w2)
        mine = slice(self.first_channel, self.first_channel + self.heads_local * self.head_size)
        return self._heads(k[..., mine]), self._heads(v[..., mine])

    def _queries(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        dx = prev - x
        lora = torch.tanh((x + dx * self.time_maa_x) @ self.time_maa_q_w1) @ self.time_maa_q_w2
        q = self.query(x + dx * (self.time_maa_q + lora))
        return self._heads(layer_norm_over_heads(q, self.ln_q.weight, self.ln_q.bias, self.d_model, self.eps,
                                                 self.dims))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # [s, b, h n] -> [b, h, s, n]
        return t.unflatten(-1, (self.heads_local, self.head_size)).permute(1, 2, 0, 3)

    def _out(self, o: torch.Tensor) -> torch.Tensor:  # o [b, h, s, n]
        o = o.permute(2, 0, 1, 3).flatten(-2)  # [s, b, h n]
        return self.output(layer_norm_over_heads(o, self.ln_x.weight, self.ln_x.bias, self.d_model, self.eps,
                                                 self.dims))

    def forward(self, x: torch.Tensor, docs=None, context=None, residual=None) -> torch.Tensor:  # [s, b, d]
        kc, xo = self._cache(x, context, residual)
        starts = None
        if docs is not None:
            seg = docs.all_segment_ids  # [S, b]
            starts = torch.cat([torch.zeros_like(seg[:1], dtype=torch.bool), seg[1:] != seg[:-1]])
        k, v = self._keys_values(kc, xo, starts)
        q = self._queries(x, token_shift(x, docs, self.dims))
        k, v = k.to(q.dtype), v.to(q.dtype)
        start = chunk_start(x.shape[0], self.dims)
        seen = start + x.shape[0]  # the keys up to this chunk's last query
        if docs is not None and blocks_pay(docs.reach, seen) and not torch.compiler.is_exporting():
            # within documents causal attention is a sliding window of their reach: in blocks, no [s, S] mask
            return self._out(sliding_window_attention(q, k[:, :, :seen], v[:, :, :seen], docs.reach,
                                                      q_seg=docs.segment_ids.t(),
                                                      k_seg=docs.all_segment_ids[:seen].t()))
        if docs is None and x.shape[0] == kc.shape[0] and not torch.compiler.is_exporting():  # no CP: causal alone
            return self._out(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        pos = start + torch.arange(x.shape[0], device=x.device)
        allowed = torch.arange(kc.shape[0], device=x.device)[None, :] <= pos[:, None]  # [s, S]
        if docs is not None:  # and only its own document
            allowed = (allowed & (docs.segment_ids.t()[:, :, None] == docs.all_segment_ids.t()[:, None, :]))
            allowed = allowed.unsqueeze(1)
        return self._out(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))

    def init_state(self, batch: int, max_len: int):
        w = self.query.weight
        state = {"shift": torch.zeros(batch, w.shape[1], device=w.device, dtype=w.dtype)}
        if self.builds_cache:  # the whole model's cache: compressed keys and token ids
            state["compressed"] = torch.zeros(batch, max_len, self.compress.weight.shape[0], device=w.device,
                                              dtype=w.dtype)
            state["tokens"] = torch.zeros(batch, max_len, device=w.device, dtype=torch.int32)
        return state

    def prefill(self, x: torch.Tensor, max_len: int, context=None, residual=None):  # [s, b, d] -> (out, state)
        """The prompt in one pass (the first GOLD layer publishes the cache, as in ``forward``); the state: the last
        input (token shift) and, in the first GOLD layer, the prompt's compressed keys and token ids."""
        s, b = x.shape[:2]
        out = self.forward(x, None, context, residual)
        state = self.init_state(b, max_len)
        state["shift"] = x[-1].clone()
        if self.builds_cache:
            state["compressed"][:, :s] = self.compress(residual).transpose(0, 1)
            state["tokens"][:, :s] = context.tokens
        return out, state

    def step(self, x: torch.Tensor, state, pos: int, context=None, residual=None) -> torch.Tensor:  # [1, b, d]
        if self.builds_cache:
            state["compressed"][:, pos] = self.compress(residual[0])
            state["tokens"][:, pos] = context.tokens
            embeddings = context.embed(state["tokens"][:, : pos + 1].t().long())  # [pos + 1, b, d]
            context.published[PUBLISHED] = self.decompressed(embeddings,
                                                             state["compressed"][:, : pos + 1].transpose(0, 1))
        kc, xo = context.published[PUBLISHED]
        k, v = self._keys_values(kc, xo, None)
        q = self._queries(x, state["shift"].unsqueeze(0))
        state["shift"] = x[0]
        return self._out(F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype)))


def build(c: GoldConfig, b: Build) -> GoldAttention:
    return GoldAttention(c.d_model, c.rwkv_head_size, compression=c.gold_compression, mix_lora=c.rwkv_mix_lora,
                         value_lora=c.gold_value_lora, eps=c.norm_eps, builds_cache=b.first_of_kind,
                         init_std=b.init_std, out_std=b.out_std, dims=b.dims)


def check_tensor_parallel(c: GoldConfig, tp: int) -> str | None:
    """Heads split over ranks."""
    return divisibility(tp, {"the GOLD heads (model.d_model / model.rwkv_head_size)": c.heads})


def flops_per_token(c: GoldConfig, seq_len: int) -> dict[str, float]:
    """Per GOLD layer: ``W_q``, ``W_o`` and the LoRAs (query mix ``Q_1 Q_2``, key/value mix ``M_1 M_2`` with its
    two outputs, ``K_1 K_2``, ``V_1 V_2``), 2 per weight; softmax attention's scores and weighted values over the
    ``(s + 1) / 2`` keys a causal query sees on average, all heads together ``d`` wide."""
    d, mix, lora = c.d_model, c.rwkv_mix_lora, c.gold_value_lora
    weights = 2 * d * d + (d * mix + mix * d) + (d * 2 * mix + 2 * mix * d) + 2 * (d * lora + lora * d)
    return {"projections": 2.0 * weights, "scores": 4.0 * d * (seq_len + 1) / 2}


def cache_flops_per_token(c: GoldConfig, seq_len: int) -> dict[str, float]:
    """The one cache of the model, made by the first GOLD layer: ``c = W_a x`` and ``kc = W_b [e; c]``."""
    d, small = c.d_model, c.d_model // c.gold_compression
    return {"key cache": 2.0 * (d * small + (d + small) * d)}


SPECS = (SublayerSpec("G", "GOLD attention over the compressed key cache (GoldFinch)", GoldConfig, build,
                      check_tensor_parallel, lambda c: ContextParallel("keys_values"), pipeline_parallel=False,
                      flops_per_token=flops_per_token, shared_flops_per_token=cache_flops_per_token),)
