"""The routed hybrid ('Y'): the causal capacity rule against a per-token reference, forced routing against the
plain Mamba-2 / attention mixers, the block against its paths run on each sequence's routed tokens, decoding,
causality, state compression, the balance loss and the config's checks."""

import math

import pytest
import torch
from pydantic import ValidationError

from chimera.models.documents import PackedDocuments
from chimera.models.mixers.routed_hybrid import ATTENTION, RESIDUAL, SSM, RoutedHybrid, RoutedHybridConfig
from chimera.models.spec import Build
from chimera.parallel.dims import ParallelDims
from chimera.parallel.sharding import initialize_parameters
from helpers import assert_causal

D = 32
BASE = dict(d_model=D, num_heads=4, num_kv_heads=2, ssm_state=16, ssm_expand=2, ssm_head_dim=8, ssm_groups=2,
            ssm_chunk=8, conv_kernel=4, rope_fraction=1.0)


def block(seed=0, dtype=torch.float64, bridges=0.0, **fields) -> RoutedHybrid:
    m = RoutedHybrid(RoutedHybridConfig(**{**BASE, **fields}), Build(ParallelDims(), 0.2, 0.1))
    initialize_parameters(m, seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 7)
        m.router.weight.normal_(0, 1.0, generator=g)  # decisive routing
        m.bridge_ssm_to_attention.normal_(0, bridges, generator=g)
        m.bridge_attention_to_ssm.normal_(0, bridges, generator=g)
    return m.to(dtype)


def x_seq(s=40, b=3, seed=1, dtype=torch.float64):
    return torch.randn(s, b, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rule_by_hand(first: list[int], capacity, overflow_other: bool) -> list[int]:
    """The admission rule of the module docstring, in Python integers, for one sequence."""
    counts, paths = [0, 0], []
    for n, j in enumerate(first):
        limit = [math.floor(c * (n + 1) + 1e-9) for c in capacity]
        if counts[j] < limit[j]:
            path = j
        elif overflow_other and counts[1 - j] < limit[1 - j]:
            path = 1 - j
        else:
            path = RESIDUAL
        paths.append(path)
        if path != RESIDUAL:
            counts[path] += 1
    return paths


@pytest.mark.parametrize("capacity,overflow", [((0.6, 0.3), "residual"), ((0.7, 0.4), "other"), ((1.0, 0.25), "other")])
def test_capacity_is_respected_exactly_at_every_prefix(capacity, overflow):
    m = block(routed_capacity_ssm=capacity[0], routed_capacity_attention=capacity[1], routed_overflow=overflow)
    first = torch.randint(0, 2, (97, 5), generator=torch.Generator().manual_seed(3))
    path, full = m.route(first)
    for col in range(first.shape[1]):
        assert path[:, col].tolist() == rule_by_hand(first[:, col].tolist(), capacity, overflow == "other")
    n = torch.arange(1, first.shape[0] + 1)[:, None]
    for j, c in ((SSM, capacity[0]), (ATTENTION, capacity[1])):
        admitted = (path == j).long().cumsum(0)  # A_j(n) at every prefix n
        assert (admitted <= torch.floor(c * n + 1e-9).long()).all()
    assert (full == (path != first)).all() and full.any()


def test_router_forced_to_one_path_is_that_mixer():
    x = x_seq()
    seg = torch.tensor([0] * 15 + [1] * 25)[None].expand(3, -1)
    pos = torch.cat([torch.arange(15), torch.arange(25)])[None].expand(3, -1)
    docs = PackedDocuments.from_batch(seg, pos)
    for j, name in ((SSM, "ssm"), (ATTENTION, "attention")):
        m = block(routed_forced=True)
        with torch.no_grad():
            m.router.bias.copy_(torch.tensor([1.0, -1.0]) * (1 if j == SSM else -1))
        for d in (None, docs):
            torch.testing.assert_close(m(x, d), getattr(m, name)(x, d), rtol=0, atol=1e-6)
        assert m.metrics()[f"fraction_{name}"] == 1.0 and m.auxiliary_loss() is None


def test_block_is_its_paths_over_each_sequences_routed_tokens():
    """Per sequence: gather its routed tokens, run the plain mixer on that subsequence (documents kept), put the
    outputs back scaled by the router's probability, add the gated bridges by hand."""
    m = block(bridges=0.5, routed_capacity_ssm=0.7, routed_capacity_attention=0.4)
    x = x_seq()
    seg = torch.tensor([0] * 22 + [1] * 18)[None].expand(3, -1)
    pos = torch.cat([torch.arange(22), torch.arange(18)])[None].expand(3, -1)
    docs = PackedDocuments.from_batch(seg, pos)
    y = m(x, docs)
    p = m.router(x).softmax(-1)
    path, _ = m.route(m.router(x).argmax(-1))
    assert (path == RESIDUAL).any() and (path == SSM).any() and (path == ATTENTION).any()
    for col in range(x.shape[1]):
        want = torch.zeros(x.shape[0], D, dtype=x.dtype)
        outs = {}
        for j, mixer in ((SSM, m.ssm), (ATTENTION, m.attention)):
            where = (path[:, col] == j).nonzero()[:, 0]
            sub = PackedDocuments.from_batch(seg[col:col + 1, where], pos[col:col + 1, where])
            outs[j] = torch.zeros(x.shape[0], D, dtype=x.dtype)
            outs[j][where] = mixer(x[where, col:col + 1], sub)[:, 0]
        for t in range(x.shape[0]):
            j = int(path[t, col])
            if j == RESIDUAL:
                continue
            want[t] = p[t, col, j] * outs[j][t]
            other, gate = (ATTENTION, m.bridge_attention_to_ssm) if j == SSM else (SSM, m.bridge_ssm_to_attention)
            before = [u for u in range(t + 1) if path[u, col] == other and seg[col, u] == seg[col, t]]
            if before:
                want[t] += torch.tanh(gate) * outs[other][before[-1]]
        torch.testing.assert_close(y[:, col], want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("overflow", ["other", "residual"])
def test_decoding_equals_forward(overflow):
    m = block(bridges=0.5, routed_capacity_ssm=0.6, routed_capacity_attention=0.5, routed_overflow=overflow,
              routed_state_ratios=[1, 2])
    with torch.no_grad():
        m.ssm.state_projection.importance[8:] = 0.05  # the state keeps 8 of 16 dims
    x = x_seq(s=30)
    full = m(x)
    assert m.metrics()["state_compression_ratio"] == 2.0
    state = m.init_state(x.shape[1], x.shape[0])
    assert state["ssm"]["ssm"].shape[-1] == 8
    steps = torch.cat([m.step(x[t:t + 1], state, t) for t in range(x.shape[0])])
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-10)


def test_causal():
    m = block(bridges=0.5, routed_capacity_ssm=1.0, routed_capacity_attention=0.5)
    assert_causal(m, x_seq(), t=23)


def test_state_compression_with_nothing_dropped_equals_the_full_state():
    """Importance 0 on 12 of 16 dims: the 4x-compressed state computes what the full state does."""
    small = block(seed=2, routed_capacity_attention=0.3, routed_state_ratios=[1, 2, 4])
    w = torch.zeros(16, dtype=torch.float64)
    w[[1, 5, 9, 14]] = torch.tensor([1.0, -0.5, 2.0, 0.7], dtype=torch.float64)
    with torch.no_grad():
        small.ssm.state_projection.importance.copy_(w)
    x = x_seq()
    y_small = small(x)
    m = small.metrics()
    assert m["state_compression_ratio"] == 4.0 and m["state_dropped_importance"] == 0.0
    small.ssm.state_projection.ratios = [1]  # the same importance over the full 16-dim state
    torch.testing.assert_close(small(x), y_small, rtol=0, atol=1e-10)
    assert small.metrics()["state_compression_ratio"] == 1.0


def test_balance_loss_closed_form():
    m = block(routed_aux_loss_coef=0.3).train()
    x = x_seq()
    m(x)
    p = m.router(x).softmax(-1).flatten(0, 1)
    f = torch.nn.functional.one_hot(p.argmax(-1), 2).double().mean(0)
    torch.testing.assert_close(m.auxiliary_loss(), 0.3 * 2 * (f * p.mean(0)).sum())
    m.auxiliary_loss().backward()
    assert m.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("field,value,says", [
    ("routed_capacity_attention", 0.0, "greater than 0"), ("routed_capacity_ssm", 1.5, "less than or equal to 1"),
    ("routed_overflow", "drop", "routed_overflow must be 'other' or 'residual'"),
    ("routed_aux_loss_coef", -1.0, "greater than or equal to 0"),
    ("routed_state_ratios", [3], "routed_state_ratios=[3]"), ("routed_state_ratios", [8], "routed_state_ratios=[8]"),
    ("routed_state_keep", 0.0, "greater than 0")])
def test_bad_config_values(field, value, says):
    with pytest.raises(ValidationError, match=".*" + says.replace("[", r"\[").replace("]", r"\]")):
        RoutedHybridConfig(**{**BASE, field: value})
