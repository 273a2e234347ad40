"""Causal BigBird: the block pattern (sliding 3, global 2, random 2 per query block, fixed per layer), the block-sparse
path against a dense masked reference built here from the rules, decoding, causality."""

import math

import pytest
import torch
from pydantic import ValidationError

from chimera.models.causal_lm import meta_model
from chimera.models.config import ModelConfig
from chimera.models.documents import PackedDocuments
from chimera.models.mixers.bigbird import in_document_positions
from chimera.models.spec import Build
from chimera.models.sublayer import build_mixer
from chimera.parallel.dims import ParallelDims
from chimera.parallel.sharding import initialize_parameters
from helpers import assert_causal

BLOCK = 4


def make_attention(seed=0, layer=0, **fields):
    cfg = ModelConfig(pattern="K", vocab_size=64, d_model=16, num_heads=4, num_kv_heads=2, init_std=0.3,
                      **{"bigbird_block": BLOCK, **fields})
    attention = build_mixer("K", cfg, Build(ParallelDims(), cfg.init_std, cfg.init_std, layer=layer))
    initialize_parameters(attention, seed)
    return attention.double(), cfg


def x_seq(s=45, b=2, d=16, seed=1):
    return torch.randn(s, b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_each_query_block_sees_3_sliding_2_global_and_2_random_earlier_blocks():
    attention, _ = make_attention()
    table = attention.table(16)
    for i in range(16):
        seen = set(table[i][table[i] >= 0].tolist())
        sliding, first = {j for j in (i - 2, i - 1, i) if j >= 0}, {j for j in (0, 1) if j <= i}
        assert sliding | first <= seen
        drawn = seen - sliding - first
        candidates = set(range(2, max(2, i - 2)))  # earlier, neither sliding nor global
        assert drawn <= candidates and len(drawn) == min(2, len(candidates)), (i, seen)
    assert len({tuple(r) for r in table[8:].tolist()}) > 1  # random, not one fixed choice


def test_the_random_blocks_are_fixed_per_layer_by_the_seed():
    a, _ = make_attention(layer=2)
    assert torch.equal(a.table(20), make_attention(seed=7, layer=2)[0].table(20))  # weights' seed: no matter
    assert not torch.equal(a.table(20), make_attention(layer=3)[0].table(20))
    assert not torch.equal(a.table(20), make_attention(layer=2, bigbird_seed=1)[0].table(20))
    assert torch.equal(a.table(20)[:12], a.table(12))  # a longer sequence keeps the earlier blocks' choice
    model = meta_model(ModelConfig(pattern="K-K", vocab_size=64, d_model=16, num_heads=4, mlp_hidden=32))
    first, second = model.layers[0].mixer, model.layers[2].mixer
    assert (first.pattern["layer"], second.pattern["layer"]) == (0, 2)


def rules_mask(table: torch.Tensor, s: int) -> torch.Tensor:
    """``[s, s]``: key s' visible from query t iff s' <= t and block(s') is one of block(t)'s."""
    t, k = torch.arange(s)[:, None], torch.arange(s)[None, :]
    member = torch.zeros(table.shape[0], table.shape[0], dtype=torch.bool)
    for i, row in enumerate(table.tolist()):
        for j in row:
            if j >= 0:
                member[i, j] = True
    return member[t // BLOCK, k // BLOCK] & (k <= t)


@pytest.mark.parametrize("s", [45, 48])  # a last block cut short, and whole blocks
def test_block_sparse_attention_equals_dense_masked_attention(s):
    attention, cfg = make_attention()
    x = x_seq(s)
    pos = torch.arange(s)
    q, k, v = attention._project(x, pos)
    k, v = k[:, attention.kv_of_head], v[:, attention.kv_of_head]
    scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.effective("head_dim"))
    mask = rules_mask(attention.table(-(-s // BLOCK)), s)
    o = (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v).permute(2, 0, 1, 3).flatten(-2)
    expected = attention.o_proj(o)
    torch.testing.assert_close(attention(x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attention.forward_dense(x), expected, rtol=1e-10, atol=1e-10)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    o_all = (scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v).permute(2, 0, 1, 3).flatten(-2)
    assert (attention(x) - attention.o_proj(o_all)).abs().max() > 1e-3  # the pattern hides keys full attention sees


def test_decoding_cache_gives_the_training_time_pattern():
    attention, _ = make_attention()
    x = x_seq()
    state = attention.init_state(2, 45)
    steps = torch.cat([attention.step(x[t:t + 1], state, t) for t in range(45)])
    torch.testing.assert_close(steps, attention(x), rtol=1e-10, atol=1e-10)


def test_causal_and_blind_outside_the_pattern():
    attention, _ = make_attention()
    x = x_seq()
    assert_causal(attention, x, t=30)
    table = attention.table(12)
    t = 43  # block 10
    hidden = [j for j in range(10) if j not in table[10].tolist()]
    assert hidden
    for j, visible in ((hidden[0], False), (0, True), (int(table[10][2]), True)):
        x2 = x.clone()
        x2[j * BLOCK] += 1.0
        assert bool((attention(x2)[t] - attention(x)[t]).abs().max() > 1e-9) == visible, j


def test_packed_documents_each_get_their_own_pattern():
    attention, _ = make_attention()
    x = x_seq(s=50, b=1)
    lengths = (13, 37)
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    docs = PackedDocuments.from_batch(seg, pos)
    torch.testing.assert_close(in_document_positions(docs.all_segment_ids), pos.t())
    separate = torch.cat([attention(x[:13]), attention(x[13:])])
    torch.testing.assert_close(attention(x, docs), separate, rtol=1e-10, atol=1e-10)


def test_block_sparse_path_with_documents_equals_the_dense_masked_form():
    """Rows packed differently (documents of 1 token, blocks cut short by a document's end): values and gradients."""
    attention, _ = make_attention()
    x = x_seq(s=50).requires_grad_(True)
    lengths = [(13, 37), (5, 1, 30, 14)]
    seg = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths])
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    docs = PackedDocuments.from_batch(seg, pos)
    sparse, dense = attention(x, docs), attention.forward_dense(x, docs)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-10)
    (g_sparse,), (g_dense,) = (torch.autograd.grad(y.square().sum(), x) for y in (sparse, dense))
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-9, atol=1e-9)


def test_bad_pattern_values_are_refused_in_one_line():
    with pytest.raises(ValidationError, match="bigbird_block"):
        ModelConfig(pattern="K", vocab_size=64, d_model=16, bigbird_block=0)
