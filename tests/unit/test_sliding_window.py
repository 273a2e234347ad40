"""Local attention in blocks (``sliding_window_attention``) equals softmax attention with the dense window mask:
outputs and gradients, at lengths that do and do not fill the last block, with a CP-style halo whose first positions
do not exist, and with packed documents; and a local-attention layer longer than its window runs it."""

import pytest
import torch
import torch.nn.functional as F

from chimera.models.mixers import attention as attention_mixer
from chimera.models.mixers.attention import sliding_window_attention
from chimera.parallel.dims import SINGLE_PROCESS
from chimera.parallel.sharding import initialize_parameters


def dense(q, k, v, window, key_ok=None, q_seg=None, k_seg=None, scale=None):
    """The reference: the full [s, s_k] mask of the window (query t sees t - window < u <= t), then SDPA."""
    s, s_k = q.shape[2], k.shape[2]
    q_pos = torch.arange(s) + (s_k - s)
    diff = q_pos[:, None] - torch.arange(s_k)[None, :]
    allowed = (diff >= 0) & (diff < window)
    if key_ok is not None:
        allowed = allowed & key_ok[None, :]
    if q_seg is not None:
        allowed = (allowed & (q_seg[:, :, None] == k_seg[:, None, :])).unsqueeze(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def tensors(b, h, s, s_k, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64, requires_grad=True) for n in (s, s_k, s_k))
    return q, k, v


def assert_same_with_gradients(q, k, v, window, block=None, **kw):
    out = sliding_window_attention(q, k, v, window, block=block, **kw)
    ref = dense(q, k, v, window, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, e in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("s,window,block", [(32, 8, None), (37, 8, None), (37, 8, 3), (5, 8, None), (40, 1, None)])
def test_blocks_equal_the_dense_window_mask(s, window, block):
    q, k, v = tensors(2, 3, s, s)
    assert_same_with_gradients(q, k, v, window, block=block, scale=0.3)


def test_a_halo_whose_first_positions_do_not_exist():
    """A CP chunk at sequence position 3 with window 8: 7 halo keys before it, the first 4 (positions < 0) masked;
    a longer halo than the window needs is cut."""
    s, window = 29, 8
    q, k, v = tensors(1, 2, s, s + window - 1)
    key_ok = torch.arange(s + window - 1) - (window - 1) + 3 >= 0
    assert_same_with_gradients(q, k, v, window, key_ok=key_ok)
    q, k, v = tensors(1, 2, s, s + 12, seed=1)
    assert_same_with_gradients(q, k, v, window)


def test_packed_documents():
    s, window = 45, 8
    q, k, v = tensors(2, 2, s, s)
    seg = torch.zeros(2, s, dtype=torch.long)
    seg[0, 10:] = 1
    seg[0, 12:] = 2  # a two-token document inside a block
    seg[1, 30:] = 1
    assert_same_with_gradients(q, k, v, window, q_seg=seg, k_seg=seg)


def test_a_local_attention_layer_three_windows_long_runs_in_blocks(monkeypatch):
    """The layer's forward equals its dense-mask forward (the blocked path switched off), and takes the blocked path."""
    torch.manual_seed(0)
    layer = attention_mixer.Attention(16, 4, 2, 4, window=6, rope=attention_mixer.Rope(4, 10000.0), init_std=0.2,
                                      out_std=0.2, dims=SINGLE_PROCESS)
    initialize_parameters(layer, seed=0)  # parameters are created empty; their declared initialisers fill them
    layer = layer.double()
    x = torch.randn(23, 2, 16, dtype=torch.float64)
    calls = []
    blocked = attention_mixer.sliding_window_attention
    monkeypatch.setattr(attention_mixer, "sliding_window_attention",
                        lambda *a, **kw: calls.append(1) or blocked(*a, **kw))
    out = layer(x)
    assert calls == [1] and torch.isfinite(out).all()
    monkeypatch.setattr(attention_mixer.Attention, "_band", lambda self, *a: None)
    torch.testing.assert_close(out, layer(x), rtol=1e-12, atol=1e-12)


def packed(lengths_per_row):
    """``PackedDocuments`` of rows of documents of the given lengths."""
    from chimera.models.documents import PackedDocuments

    seg = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths_per_row])
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])
    return PackedDocuments.from_batch(seg, pos)


@pytest.mark.parametrize("window,lengths,band", [
    (None, [(9, 3, 10, 2, 6), (7, 7, 7, 9)], 10),  # global: the longest document's reach, a third of the keys
    (None, [(9, 3, 11, 1, 6), (7, 7, 7, 9)], None),  # a document longer than a third of the sequence: the dense mask
    (32, [(5, 25), (30,)], None),  # local, the sequence within its window, long documents: the dense mask
    (32, [(9, 3, 10, 2, 6), (7, 7, 7, 9)], 10),  # local, the sequence within its window: the documents' reach
    (8, [(9, 3, 11, 1, 6), (7, 7, 7, 9)], 8),  # local: its window, shorter than the documents' reach
    (12, [(3, 5, 4, 6, 6, 6), (2,) * 15], 6),  # local: the documents' reach, shorter than its window
])
def test_attention_over_packed_documents_runs_in_blocks_of_their_reach(monkeypatch, window, lengths, band):
    """Within packed documents, global attention is a sliding window of the longest document's reach: the layer
    takes the blocked path with that window where it is at most a third of the sequence (no SDPA call then has an [s, s]
    mask) and equals its dense-mask forward, outputs and parameter gradients."""
    torch.manual_seed(0)
    layer = attention_mixer.Attention(16, 4, 2, 4, window=window, rope=attention_mixer.Rope(4, 10000.0),
                                      init_std=0.2, out_std=0.2, dims=SINGLE_PROCESS)
    initialize_parameters(layer, seed=0)
    layer = layer.double()
    docs = packed(lengths)
    s = docs.segment_ids.shape[0]
    x = torch.randn(s, 2, 16, dtype=torch.float64)
    bands, masks = [], []
    blocked, sdpa = attention_mixer.sliding_window_attention, F.scaled_dot_product_attention
    monkeypatch.setattr(attention_mixer, "sliding_window_attention",
                        lambda q, k, v, w, **kw: bands.append(w) or blocked(q, k, v, w, **kw))
    monkeypatch.setattr(attention_mixer.F, "scaled_dot_product_attention",
                        lambda *a, attn_mask=None, **kw: masks.append(tuple(attn_mask.shape[-2:])) or
                        sdpa(*a, attn_mask=attn_mask, **kw))
    out = layer(x, docs)
    grads = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
    assert bands == ([] if band is None else [band])
    assert ((s, s) in masks) == (band is None)
    monkeypatch.setattr(attention_mixer.Attention, "_band", lambda self, *a: None)
    ref = layer(x, docs)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, torch.autograd.grad(ref.square().sum(), list(layer.parameters()))):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_global_attention_over_one_document_per_row_is_causal_without_a_mask(monkeypatch):
    """One document per row, no context parallelism: SDPA's is_causal (no mask given), equal to the dense causal
    mask, outputs and parameter gradients; and prefill takes it too."""
    torch.manual_seed(0)
    layer = attention_mixer.Attention(16, 4, 2, 4, window=None, rope=attention_mixer.Rope(4, 10000.0),
                                      init_std=0.2, out_std=0.2, dims=SINGLE_PROCESS)
    initialize_parameters(layer, seed=0)
    layer = layer.double()
    x = torch.randn(23, 2, 16, dtype=torch.float64)
    calls, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(attention_mixer.F, "scaled_dot_product_attention",
                        lambda *a, attn_mask=None, is_causal=False, **kw: calls.append((attn_mask, is_causal)) or
                        sdpa(*a, attn_mask=attn_mask, is_causal=is_causal, **kw))
    out = layer(x)
    prefilled, _ = layer.prefill(x, max_len=32)
    assert calls == [(None, True), (None, True)]
    grads = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
    monkeypatch.setattr(attention_mixer.Attention, "_only_causal", lambda self, *a: False)
    ref = layer(x)
    assert calls[-1][0].shape[-2:] == (23, 23) and not calls[-1][1]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(prefilled, ref, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, torch.autograd.grad(ref.square().sum(), list(layer.parameters()))):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_kv_heads_read_as_a_slice_where_groups_are_regular():
    """The local query heads' kv heads as one slice where each kv head serves an equal run of consecutive query heads
    (SDPA's grouped layout), None where a rank's heads straddle groups unevenly (replicated kv heads under TP)."""
    read = attention_mixer.Attention._kv_heads_read
    assert read(torch.tensor([0, 0, 1, 1])) == slice(0, 2)
    assert read(torch.tensor([0, 1, 2])) == slice(0, 3)
    assert read(torch.tensor([1, 1])) == slice(1, 2)  # a rank's two heads, both of the second kv head
    assert read(torch.tensor([0, 0, 1])) is None  # 3 heads of a group of 2 on one rank
    assert read(torch.tensor([1, 2, 2])) is None


@pytest.mark.parametrize("window", [None, 16])  # causal without a mask; a window's dense mask (23 < 3 x 16)
def test_grouped_heads_reach_sdpa_ungathered_and_equal_the_gathered(monkeypatch, window):
    """Grouped-query attention (4 query heads, 2 kv heads) passes the 2 kv heads to SDPA (``enable_gqa``), equal to
    gathering a kv head per query head: outputs and parameter gradients."""
    layer = attention_mixer.Attention(16, 4, 2, 4, window=window, rope=attention_mixer.Rope(4, 10000.0),
                                      init_std=0.2, out_std=0.2, dims=SINGLE_PROCESS)
    initialize_parameters(layer, seed=0)
    layer = layer.double()
    x = torch.randn(23, 2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    calls, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(attention_mixer.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: calls.append((k.shape[1], kw.get("enable_gqa"))) or sdpa(q, k, v, **kw))
    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
    layer.kv_heads_read = None
    ref = layer(x)
    assert calls == [(2, True), (4, False)]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, torch.autograd.grad(ref.square().sum(), list(layer.parameters()))):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
