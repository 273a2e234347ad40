"""Causal BigBird: block-sparse attention (Zaheer et al., "Big Bird: Transformers for Longer Sequences", NeurIPS
2020, arXiv 2007.14062), made causal for a language model.

The sequence is cut into blocks of ``b = bigbird_block`` positions; query block ``i`` attends (Sec. 2, Fig. 1,
the ITC form with global tokens taken from the sequence) to the key blocks::

    sliding  W(i) = {i - w + 1, ..., i}                  (w = bigbird_sliding_blocks = 3: i-2, i-1, i)
    global   G(i) = {0, ..., g - 1} with j <= i           (g = bigbird_global_blocks = 2: the first blocks)
    random   R(i) = r blocks drawn among {j < i} \\ (W u G)   (r = bigbird_random_blocks = 2; all of them if fewer)

    o_t = softmax(q_t K^T / sqrt(d_head) + M) V,   M_ts = 0 iff block(s) in W u G u R (block(t)) and s <= t

``R(i)`` is drawn from a generator seeded by (``bigbird_seed``, the layer's index, ``i``) alone, so training,
every context-parallel rank and decoding see the same blocks. Causality: only earlier blocks are candidates,
and within the query's own block the usual ``s <= t``. (transformers' BigBird is the bidirectional encoder;
it has no causal form, so this one is held to the dense masked reference below.)

Heads, projections and RoPE are global attention's (``chimera.models.mixers.attention``); only the mask differs.

Reference and fast path: ``forward_dense`` is the definition, dense scores masked by ``M``; ``forward`` computes
only the visible blocks: for each query block, its (at most ``w + g + r``) key blocks are gathered, giving
``[blocks, b, (w + g + r) b]`` scores instead of ``[s, s]``. With packed documents the pattern is laid out per
document (blocks of in-document positions, as if each document ran alone): query blocks then start where documents
do, and are gathered from the flattened batch with their key blocks (``forward_dense`` masks the same way).

Decoding (``step``) keeps every earlier key and value (a KV cache of ``max_len`` slots, as global attention):
a random block may be any earlier block, so the cache is not bounded; the token at ``t`` reads exactly the
keys ``M`` lets it see, from the same block table (tested against ``forward``).

TP: query heads split (``W_q`` column parallel, ``W_o`` row parallel), kv heads split or replicated, as
attention. Context parallelism: rule ``keys_values``: every chunk's keys and values are gathered (as global
attention) and each rank's query blocks pick theirs; a chunk need not start at a block boundary.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from chimera.models.documents import in_document_positions
from chimera.models.mixers import attention
from chimera.models.mixers.attention import Attention, AttentionConfig, check_tensor_parallel, rope_of
from chimera.models.spec import Build, ContextParallel, SublayerSpec
from chimera.parallel.context import chunk_start


class BigBirdConfig(AttentionConfig):
    """The ``model:`` fields of causal BigBird (symbol ``K``), besides attention's."""

    bigbird_block: int = Field(16, ge=1, description="BigBird: positions per block")
    bigbird_sliding_blocks: int = Field(3, ge=1, description="BigBird: sliding blocks per query block, its own "
                                        "included")
    bigbird_global_blocks: int = Field(2, ge=0, description="BigBird: the first blocks, seen by every later block")
    bigbird_random_blocks: int = Field(2, ge=0, description="BigBird: random earlier blocks per query block")
    bigbird_seed: int = Field(0, ge=0, description="BigBird: seed of the random blocks (the layer's index is "
                              "added)")


def random_generator(seed: int, layer: int, block: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + layer) * 1_000_003 + block)


def key_blocks(i: int, *, sliding: int, global_blocks: int, random_blocks: int, seed: int, layer: int) -> list[int]:
    """``W(i) u G(i) u R(i)``, ascending."""
    near = set(range(max(0, i - sliding + 1), i + 1))
    first = set(range(min(global_blocks, i + 1)))
    candidates = [j for j in range(i) if j not in near and j not in first]
    picked = torch.randperm(len(candidates), generator=random_generator(seed, layer, i))[:random_blocks]
    return sorted(near | first | {candidates[k] for k in picked.tolist()})


class BigBirdAttention(Attention):
    def __init__(self, *args, block: int, sliding: int, global_blocks: int, random_blocks: int, seed: int,
                 layer: int, **kwargs):
        super().__init__(*args, window=None, **kwargs)
        self.block = block
        self.pattern = dict(sliding=sliding, global_blocks=global_blocks, random_blocks=random_blocks, seed=seed,
                            layer=layer)
        self.slots = sliding + global_blocks + random_blocks  # key blocks per query block, at most
        self._tables: dict[int, torch.Tensor] = {}

    def table(self, blocks: int) -> torch.Tensor:
        """``[blocks, slots]`` (long, CPU): the key blocks of query blocks ``0 .. blocks-1``, ``-1`` where fewer."""
        if blocks not in self._tables:
            rows = [key_blocks(i, **self.pattern) for i in range(blocks)]
            self._tables[blocks] = torch.tensor([r + [-1] * (self.slots - len(r)) for r in rows], dtype=torch.long)
        return self._tables[blocks]

    def member(self, blocks: int, device) -> torch.Tensor:
        """``[blocks, blocks]`` bool: key block ``j`` is seen by query block ``i``."""
        table = self.table(blocks)
        out = torch.zeros(blocks, blocks + 1, dtype=torch.bool)
        out.scatter_(1, table.masked_fill(table < 0, blocks), True)
        return out[:, :blocks].to(device)

    def init_state(self, batch: int, max_len: int):
        """Global attention's cache of ``max_len`` slots; the block table for ``max_len`` built now (and cached),
        before decoding or a traced graph reads it (built inside a trace, its ``randperm`` would be traced)."""
        self.table(-(-max_len // self.block))
        return super().init_state(batch, max_len)

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor, bound: int | None = None) -> torch.Tensor:
        """``M`` at sequence positions (decoding, and the dense reference without documents): ``[s_q, s_k]``; the
        block table covers positions below ``bound`` (decoding's ``max_len``: a constant in the ONNX graphs), else
        up to the largest position given."""
        last = bound - 1 if bound is not None else int(max(q_pos.max(), k_pos.max()))
        blocks = last // self.block + 1
        member = self.member(blocks, q_pos.device)
        seen = member[(q_pos // self.block)[:, None], (k_pos.clamp(min=0) // self.block)[None, :]]
        return seen & (q_pos[:, None] >= k_pos[None, :]) & (k_pos >= 0)[None, :]

    # ---- the definition: dense scores, masked -------------------------------------------------------------

    def forward_dense(self, x: torch.Tensor, docs=None) -> torch.Tensor:  # [s, b, d] -> [s, b, d]
        pos = chunk_start(x.shape[0], self.dims) + torch.arange(x.shape[0], device=x.device)
        if docs is None:
            q, k, v = self._project(x, pos)
            k, v, k_pos = self._keys_values(k, v, pos)
            return self.o_proj(self._attend(q, k, v, self.visible(pos, k_pos)))
        q_doc = docs.position_ids.t()  # [b, s]: in-document positions
        q, k, v = self._project(x, q_doc.unsqueeze(1))
        k, v, k_pos = self._keys_values(k, v, pos)
        k_seg = docs.all_segment_ids.index_select(0, k_pos).t()  # [b, s_k]
        k_doc = in_document_positions(docs.all_segment_ids).index_select(0, k_pos).t()  # [b, s_k]
        blocks = int(max(q_doc.max(), k_doc.max())) // self.block + 1
        member = self.member(blocks, x.device)
        seen = member[(q_doc // self.block)[:, :, None], (k_doc // self.block)[:, None, :]]  # [b, s, s_k]
        same = docs.segment_ids.t()[:, :, None] == k_seg[:, None, :]
        causal = pos[None, :, None] >= k_pos[None, None, :]
        return self.o_proj(self._attend(q, k, v, (seen & same & causal).unsqueeze(1)))

    # ---- the fast path: only the visible blocks -----------------------------------------------------------

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:  # [s, b, d] -> [s, b, d]
        """``docs``: packed documents (the pattern per document, see ``_forward_documents``)."""
        if docs is not None:
            return self._forward_documents(x, docs)
        s, bs = x.shape[0], self.block
        start = chunk_start(s, self.dims)
        pos = start + torch.arange(s, device=x.device)
        q, k, v = self._project(x, pos)  # [b, h, s, d], RoPE at sequence positions
        k, v, k_pos = self._keys_values(k, v, pos)  # every position up to this chunk's end (all, under CP)
        k, v = k[:, self.kv_of_head], v[:, self.kv_of_head]
        front = start % bs  # queries before this chunk in its first block: computed, then dropped
        q = torch.nn.functional.pad(q, (0, 0, front, -(front + s) % bs))
        first_block, q_blocks = (start - front) // bs, q.shape[2] // bs
        s_k = k.shape[2]
        k_blocks = -(-s_k // bs)
        keys_pad = (0, 0, 0, k_blocks * bs - s_k)
        k = torch.nn.functional.pad(k, keys_pad).unflatten(2, (k_blocks, bs))  # [b, h, kb, bs, d]
        v = torch.nn.functional.pad(v, keys_pad).unflatten(2, (k_blocks, bs))
        table = self.table(first_block + q_blocks)[first_block:].to(x.device)  # [qb, slots]
        gather = table.clamp(min=0)
        k_sel = k[:, :, gather].flatten(3, 4)  # [b, h, qb, slots * bs, d]
        v_sel = v[:, :, gather].flatten(3, 4)
        key_pos = (table[:, :, None] * bs + torch.arange(bs, device=x.device)).flatten(1)  # [qb, slots * bs]
        query_pos = (first_block + torch.arange(q_blocks, device=x.device))[:, None] * bs + torch.arange(
            bs, device=x.device)  # [qb, bs]
        allowed = ((table >= 0).repeat_interleave(bs, 1)[:, None, :] & (key_pos < s_k)[:, None, :]
                   & (key_pos[:, None, :] <= query_pos[:, :, None]))  # [qb, bs, slots * bs]
        allowed = allowed | ~allowed.any(-1, keepdim=True)  # padding queries past the end see something (dropped)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)
        scores = (q.unflatten(2, (q_blocks, bs)) @ k_sel.transpose(-1, -2)) * scale  # [b, h, qb, bs, slots * bs]
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        o = (weights @ v_sel).flatten(2, 3)[:, :, front:front + s]  # [b, h, s, d]
        return self.o_proj(o.permute(2, 0, 1, 3).flatten(-2))


    def _forward_documents(self, x: torch.Tensor, docs) -> torch.Tensor:
        """The block-sparse path with packed documents: query blocks are blocks of in-document positions (a block
        starts where a document does, and at every ``b`` positions after), wherever they fall in the sequence; each
        is gathered with its key blocks (positions ``document start + j b + r``) from the flattened batch."""
        s, batch, bs = x.shape[0], x.shape[1], self.block
        start = chunk_start(s, self.dims)
        pos = start + torch.arange(s, device=x.device)
        doc_pos = docs.position_ids.t()  # [b, s]
        q, k, v = self._project(x, doc_pos.unsqueeze(1))  # RoPE at in-document positions
        k, v, _ = self._keys_values(k, v, pos)  # [b, kv, s_k, d]: every position up to this chunk's end
        k, v = k[:, self.kv_of_head], v[:, self.kv_of_head]
        s_k = k.shape[2]
        block_start = pos - doc_pos % bs  # [b, s]: sequence position where each query's block starts
        row = torch.arange(batch, device=x.device)[:, None].expand_as(block_start)
        blocks, which = torch.unique(row * s_k + block_start, return_inverse=True)  # query blocks, by (row, start)
        n = blocks.shape[0]
        block_row, first = blocks // s_k, blocks % s_k
        in_doc_block = torch.zeros(n, dtype=torch.long, device=x.device).scatter_(
            0, which.flatten(), (doc_pos // bs).flatten())  # j: the block's index within its document
        segment = torch.zeros(n, dtype=torch.long, device=x.device).scatter_(
            0, which.flatten(), docs.segment_ids.t().flatten())
        query_pos = first[:, None] + torch.arange(bs, device=x.device)  # [n, bs]
        local = query_pos - start
        all_seg = docs.all_segment_ids.t()  # [b, S]
        real = ((local >= 0) & (local < s)
                & (all_seg[block_row[:, None], query_pos.clamp(max=all_seg.shape[1] - 1)] == segment[:, None]))
        table = self.table(int(in_doc_block.max()) + 1).to(x.device)[in_doc_block]  # [n, slots]
        doc_start = first - in_doc_block * bs
        key_pos = (doc_start[:, None, None] + table[:, :, None] * bs + torch.arange(bs, device=x.device)).flatten(1)
        allowed = ((table >= 0).repeat_interleave(bs, 1)[:, None, :]
                   & (key_pos[:, None, :] <= query_pos[:, :, None]) & real[:, :, None])  # [n, bs, slots * bs]
        allowed = allowed | ~allowed.any(-1, keepdim=True)  # padding queries see something (dropped)
        q_index = block_row[:, None] * s + local.clamp(0, s - 1)  # into the flattened [b * s] queries
        k_index = block_row[:, None] * s_k + key_pos.clamp(0, s_k - 1)  # into the flattened [b * s_k] keys
        heads, d = q.shape[1], q.shape[3]
        q_sel = q.transpose(0, 1).flatten(1, 2)[:, q_index]  # [h, n, bs, d]
        k_flat, v_flat = k.transpose(0, 1).flatten(1, 2), v.transpose(0, 1).flatten(1, 2)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)
        scores = (q_sel @ k_flat[:, k_index].transpose(-1, -2)) * scale  # [h, n, bs, slots * bs]
        o_sel = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v_flat[:, k_index]  # [h, n, bs, d]
        out = o_sel.new_zeros(batch * s, heads, d).index_put((q_index[real],), o_sel[:, real].transpose(0, 1))
        return self.o_proj(out.unflatten(0, (batch, s)).transpose(0, 1).flatten(-2))  # [s, b, h * d]


def build(c: BigBirdConfig, b: Build) -> BigBirdAttention:
    return BigBirdAttention(c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, rope=rope_of(c), init_std=b.init_std,
                            out_std=b.out_std, dims=b.dims, out_bias=c.linear_bias or c.attention_bias,
                            qkv_bias=c.attention_bias, scale=c.attention_scale, block=c.bigbird_block,
                            sliding=c.bigbird_sliding_blocks, global_blocks=c.bigbird_global_blocks,
                            random_blocks=c.bigbird_random_blocks, seed=c.bigbird_seed, layer=b.layer,
                            kernels=c.kernels)


def flops_per_token(c: BigBirdConfig, seq_len: int) -> dict[str, float]:
    """The projections, plus scores and weighted values over the keys a query sees: at most ``(w + g + r) b``
    (half a block fewer on average in its own block), fewer early in the sequence."""
    slots = c.bigbird_sliding_blocks + c.bigbird_global_blocks + c.bigbird_random_blocks
    keys = min((slots - 0.5) * c.bigbird_block, (seq_len + 1) / 2)
    return {"projections": attention.projection_flops(c), "scores": attention.score_flops(c, keys)}


SPECS = (SublayerSpec("K", "causal BigBird block-sparse attention (sliding, global and random blocks)",
                      BigBirdConfig, build, check_tensor_parallel, lambda c: ContextParallel("keys_values"),
                      flops_per_token=flops_per_token),)

