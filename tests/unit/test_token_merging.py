"""Neighbour token merging (``chimera.models.token_merging``): the batched merge equals the per-position reference
loop; it never merges across documents; merge -> causal model -> unmerge is causal and prefix-consistent; unmerge
returns one output per input position and inverts merge where nothing could merge; size-weighted means compose
over repeated merges; the cap on merges holds at every prefix; a learned threshold gets its straight-through
gradient."""

import math

import pytest
import torch

from chimera.models.conv import CausalConv1d
from chimera.models.token_merging import NeighbourMerge, merge, merge_reference


def neighbourly(b=3, n=24, d=8, seed=0, p_similar=0.5):
    """Random vectors where about ``p_similar`` of the tokens are a small step from their left neighbour."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    similar = torch.rand(b, n, generator=g) < p_similar
    for t in range(1, n):
        x[:, t] = torch.where(similar[:, t, None], x[:, t - 1] + 0.2 * torch.randn(b, d, generator=g,
                                                                                    dtype=torch.float64), x[:, t])
    return x


def packed_segments(b=3, n=24):
    """Three different packings, the last with trailing padding (-1)."""
    seg = torch.zeros(b, n, dtype=torch.long)
    seg[1, 7:] = 1
    seg[1, 16:] = 2
    seg[2, 5:] = 1
    seg[2, 19:] = -1
    return seg


def causal_conv(channels: int, seed: int = 0) -> CausalConv1d:
    conv = CausalConv1d(channels, 3).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(seed)))
        conv.bias.zero_()
    return conv


def causal_model(z: torch.Tensor) -> torch.Tensor:
    """Any causal map over merged tokens ``[b, m, d]``: a causal conv, then a running mean, then a nonlinearity."""
    u = causal_conv(z.shape[-1])(z.transpose(0, 1)).transpose(0, 1)
    running = torch.cumsum(u, dim=1) / torch.arange(1, z.shape[1] + 1, dtype=z.dtype)[:, None]
    return torch.tanh(running + z)


@pytest.mark.parametrize("threshold, max_ratio, causal, with_sizes", [
    (0.8, 0.5, True, False), (0.6, 0.2, True, True), (0.8, 0.5, False, True), (-2.0, 0.3, True, False)])
def test_matches_reference_loop(threshold, max_ratio, causal, with_sizes):
    x, seg = neighbourly(), packed_segments()
    sizes = torch.randint(1, 4, seg.shape).double() if with_sizes else None
    merged, merged_seg, merges = merge(x, seg, threshold, sizes=sizes, max_ratio=max_ratio, causal=causal)
    vectors, segments, reads = merge_reference(x, seg, threshold, sizes=sizes, max_ratio=max_ratio, causal=causal)
    assert merged.shape[1] == max(len(v) for v in vectors)
    for i in range(x.shape[0]):
        m = len(vectors[i])
        assert int(merges.merged_length[i]) == m
        torch.testing.assert_close(merged[i, :m], vectors[i], rtol=0, atol=1e-12)
        assert merged_seg[i, :m].tolist() == segments[i]
        assert merges.read_index[i].tolist() == reads[i]
        assert (merged[i, m:] == 0).all() and (merged_seg[i, m:] == -1).all() and (merges.sizes[i, m:] == 0).all()
    assert 0 < merges.merged_length.sum() < (seg >= 0).sum() or threshold > 1  # these inputs do merge


def test_never_merges_across_document_boundaries():
    x = torch.ones(2, 12, 4, dtype=torch.float64)  # all identical: every allowed pair merges
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 3, 3], [0] * 5 + [1] * 6 + [-1]])
    merged, merged_seg, merges = merge(x, seg, 0.5)
    for i in range(2):
        g = merges.group_index[i]
        for t in range(1, 12):
            if g[t] >= 0 and g[t] == g[t - 1]:
                assert seg[i, t] == seg[i, t - 1]
    # in-document pairs (0,1) of each document merge; a document's odd last token stays alone
    assert merged_seg[0].tolist() == [0, 0, 1, 1, 2, 3, 3]
    assert merges.sizes[0].tolist() == [2, 1, 2, 2, 1, 2, 2]
    assert merged_seg[1].tolist() == [0, 0, 0, 1, 1, 1, -1]  # padded to the batch's longest
    assert merges.sizes[1].tolist() == [2, 2, 1, 2, 2, 2, 0]


@pytest.mark.parametrize("max_ratio", [0.5, 0.25])
def test_merge_causal_model_unmerge_is_causal(max_ratio):
    """Changing input t changes no output before t; it does change later ones (so the test can fail)."""
    x, seg = neighbourly(), packed_segments()
    base = merge_then(x, seg, max_ratio)
    changed_somewhere = 0
    for t in range(x.shape[1]):
        for scale in (0.0, 3.0):  # to zero (breaks a merge) and scaled (keeps the direction: keeps it)
            x2 = x.clone()
            x2[:, t] = scale * x2[:, t] + (0.0 if scale else 0.3)
            out = merge_then(x2, seg, max_ratio)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
            changed_somewhere += int(not torch.equal(out[:, t:], base[:, t:]))
    assert changed_somewhere >= x.shape[1]


def merge_then(x, seg, max_ratio=0.5, threshold=0.8):
    merged, _, merges = merge(x, seg, threshold, max_ratio=max_ratio)
    return merges.unmerge(causal_model(merged))


def test_reading_its_own_group_would_leak_the_next_token():
    """The other choice, every position reading its own group (``causal=False``), lets position t see t + 1."""
    x = neighbourly(b=1)
    group = merge(x, None, 0.8)[2].group_index[0]
    t = next(t for t in range(0, 24, 2) if group[t] != group[t + 1])  # a pair (t, t + 1) that did not merge
    x2 = x.clone()
    x2[:, t + 1] = 2 * x2[:, t]  # now it does (same direction), and the mean differs from x_t
    for causal in (False, True):
        outs = []
        for inp in (x, x2):
            merged, _, merges = merge(inp, None, 0.8, causal=causal)
            outs.append(merges.unmerge(causal_model(merged)))
        assert torch.equal(outs[0][:, : t + 1], outs[1][:, : t + 1]) == causal


def test_prefix_consistent():
    """The merges and outputs of a prefix are the whole sequence's restricted to it (decoding equals forward)."""
    x, seg = neighbourly(), packed_segments()
    full = merge_then(x, seg)
    for k in (1, 2, 7, 10, 15, 23):
        torch.testing.assert_close(merge_then(x[:, :k], seg[:, :k]), full[:, :k], rtol=0, atol=1e-12)


@pytest.mark.parametrize("threshold, max_ratio", [(1.5, 0.5), (1.0, 0.5), (0.0, 0.0)])
def test_identity_where_nothing_could_merge(threshold, max_ratio):
    x, seg = neighbourly(), packed_segments()
    merged, merged_seg, merges = merge(x, seg, threshold, max_ratio=max_ratio)
    valid = seg >= 0
    assert merges.merged_length.tolist() == valid.sum(1).tolist() and merges.ratio == 1.0
    out = merges.unmerge(merged)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x * valid[..., None], rtol=0, atol=0)
    torch.testing.assert_close(merged_seg, seg, rtol=0, atol=0)


def test_unmerge_one_output_per_position():
    x, seg = neighbourly(), packed_segments()
    merged, _, merges = merge(x, seg, 0.8, causal=False)
    out = merges.unmerge(merged)
    assert out.shape == x.shape
    g = merges.group_index
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            expected = merged[i, g[i, t]] if g[i, t] >= 0 else torch.zeros_like(x[i, t])
            torch.testing.assert_close(out[i, t], expected, rtol=0, atol=0)
            if g[i, t] >= 0 and (g[i] == g[i, t]).sum() == 1:  # not merged: its own vector back
                torch.testing.assert_close(out[i, t], x[i, t], rtol=0, atol=1e-12)


def test_repeated_merges_are_means_over_input_tokens():
    """Merging merged tokens with their sizes: each token is the plain mean of the input tokens it covers."""
    x, seg = neighbourly(n=32, p_similar=0.8), packed_segments(n=32)
    z1, s1, m1 = merge(x, seg, 0.5)
    z2, s2, m2 = merge(z1, s1, 0.5, sizes=m1.sizes)
    assert m2.merged_length.sum() < m1.merged_length.sum() < (seg >= 0).sum()
    for i in range(x.shape[0]):
        final = [int(m2.group_index[i, g]) if g >= 0 else -1 for g in m1.group_index[i].tolist()]
        for slot in range(int(m2.merged_length[i])):
            members = [t for t, f in enumerate(final) if f == slot]
            torch.testing.assert_close(z2[i, slot], x[i, members].mean(0), rtol=0, atol=1e-12)
            assert float(m2.sizes[i, slot]) == len(members)
            assert {int(seg[i, t]) for t in members} == {int(s2[i, slot])}


def test_composed_merges_unmerge_in_one_step_and_stay_causal():
    x, seg = neighbourly(n=32, p_similar=0.8), packed_segments(n=32)

    def twice(inp):
        z1, s1, m1 = merge(inp, seg, 0.5)
        z2, _, m2 = merge(z1, s1, 0.5, sizes=m1.sizes)
        y = causal_model(z2)
        both = m1.then(m2)
        torch.testing.assert_close(both.unmerge(y), m1.unmerge(m2.unmerge(y)), rtol=0, atol=0)
        assert both.merged_length.tolist() == m2.merged_length.tolist() and both.ratio == pytest.approx(
            float(m2.merged_length.sum() / (seg >= 0).sum()))
        return both.unmerge(y)

    base = twice(x)
    for t in (0, 5, 13, 20, 31):
        x2 = x.clone()
        x2[:, t] = 0.3
        torch.testing.assert_close(twice(x2)[:, :t], base[:, :t], rtol=0, atol=0)


def test_merged_position_ids_count_within_documents():
    x = torch.ones(1, 9, 2, dtype=torch.float64)
    seg = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, -1]])
    _, merged_seg, merges = merge(x, seg, 0.0)
    assert merged_seg.tolist() == [[0, 0, 0, 1, 1]]
    assert merges.position_ids.tolist() == [[0, 1, 2, 0, 1]]


def test_cap_holds_at_every_prefix():
    x = torch.ones(1, 40, 3, dtype=torch.float64)
    for ratio in (0.1, 0.25, 0.5):
        _, _, merges = merge(x, None, 0.0, max_ratio=ratio)
        assert int(merges.merged_length[0]) == 40 - math.floor(ratio * 40)
        g = merges.group_index[0]
        merged_so_far = torch.cumsum(torch.cat([torch.tensor([0]), (g[1:] == g[:-1]).long()]), 0)
        assert (merged_so_far <= torch.floor(ratio * torch.arange(1, 41))).all()


@pytest.mark.parametrize("max_ratio", [0.2, 0.35])
def test_a_documents_merges_do_not_depend_on_the_documents_before_it(max_ratio):
    x = neighbourly(b=1, n=30, p_similar=0.9, seed=3)
    seg = torch.zeros(1, 30, dtype=torch.long)
    seg[0, 13:] = 1  # the first document can use up a row-wide cap; the cap counts per document
    _, merged_seg, packed = merge(x, seg, 0.5, max_ratio=max_ratio)
    _, _, alone = merge(x[:, 13:], None, 0.5, max_ratio=max_ratio)
    second = packed.group_index[0, 13:]
    assert torch.equal(second - second[0], alone.group_index[0])
    assert int((merged_seg[0] == 1).sum()) == int(alone.merged_length[0])
    _, _, first_alone = merge(x[:, :13], None, 0.5, max_ratio=max_ratio)
    assert torch.equal(packed.group_index[0, :13], first_alone.group_index[0])


def test_learned_threshold_straight_through_gradient():
    """Values equal the hard merge; d loss / d tau is the closed form of the module docstring."""
    x, seg = neighbourly(), packed_segments()
    x.requires_grad_(True)
    layer = NeighbourMerge(0.8, learned=True, temperature=0.1).double()
    merged, _, merges = layer(x, seg)
    tau = float(layer.threshold)  # 0.8 as stored (float32, then double)
    hard, _, _ = merge(x.detach(), seg, tau)
    torch.testing.assert_close(merged.detach(), hard, rtol=0, atol=0)
    w = torch.randn_like(merged)
    (merged * w).sum().backward()
    # closed form: sum over merged B tokens t of <w_g, z_g - x_t> * dp_t/dtau, dp/dtau = -p (1 - p) / T
    cos = torch.nn.functional.cosine_similarity(x[:, 1:], x[:, :-1], dim=-1).detach()
    p = torch.sigmoid((cos - tau) / 0.1)
    g = merges.group_index
    expected = 0.0
    for i in range(x.shape[0]):
        for t in range(1, x.shape[1]):
            if g[i, t] >= 0 and g[i, t] == g[i, t - 1]:
                zg = hard[i, g[i, t]]
                expected += float((w[i, g[i, t]] * (zg - x[i, t].detach())).sum() * -p[i, t - 1] * (1 - p[i, t - 1])
                                  / 0.1)
    assert layer.threshold.grad is not None and layer.threshold.grad.abs() > 0
    torch.testing.assert_close(layer.threshold.grad, torch.tensor([expected], dtype=torch.float64), rtol=1e-9,
                               atol=1e-12)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gradients_reach_every_input_through_merge_and_unmerge():
    x, seg = neighbourly(), packed_segments()
    x.requires_grad_(True)
    merged, _, merges = merge(x, seg, 0.8, causal=False)
    merges.unmerge(merged).sum().backward()
    valid = seg >= 0
    assert (x.grad[valid].abs().sum(-1) > 0).all() and (x.grad[~valid] == 0).all()


def test_module_metrics_and_bad_config():
    x, seg = neighbourly(), packed_segments()
    layer = NeighbourMerge(0.8)
    _, _, merges = layer(x, seg)
    metrics = layer.metrics()
    assert metrics["merged_length"] == pytest.approx(float(merges.merged_length.float().mean()))
    assert metrics["merge_ratio"] == pytest.approx(float(merges.merged_length.sum() / (seg >= 0).sum()))
    assert metrics["merge_threshold"] == pytest.approx(0.8) and list(layer.parameters()) == []
    with pytest.raises(ValueError, match="max_ratio=0.7 is outside"):
        NeighbourMerge(0.8, max_ratio=0.7)
    with pytest.raises(ValueError, match="temperature=0"):
        NeighbourMerge(0.8, temperature=0)
