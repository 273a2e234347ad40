"""Mixture of experts: routing and losses by hand, dropless and capacity outputs against a per-token
reference, gradients, and the tensor-parallel gradient contract emulated in one process."""

import math

import pytest
import torch
import torch.nn.functional as F

from chimera.models.channels.moe import MoE, route
from chimera.parallel.dims import ParallelDims
from chimera.parallel.sharding import full_state_dict, initialize_parameters, shard_of

LN2 = math.log(2.0)


def make_moe(d=8, hidden=16, num_experts=4, top_k=2, seed=0, dims=None, **kw):
    moe = MoE(d, hidden, num_experts, top_k, init_std=0.5, out_std=0.5, dims=dims or ParallelDims(), **kw)
    initialize_parameters(moe, seed)
    return moe.double()


def x_seq(s=6, b=2, d=8, seed=1):
    return torch.randn(s, b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def expert_mlp(moe, e, v):
    """Expert ``e`` on one token vector, written out."""
    return moe.down_weight[e] @ (F.silu(moe.gate_weight[e] @ v) * (moe.up_weight[e] @ v))


def reference(moe, x, kept=None):
    """Per token: sum over its top-k experts (those in ``kept``, if given) of weight * expert(token)."""
    s, b, d = x.shape
    flat = x.reshape(-1, d)
    probs = (flat @ moe.router.weight.T).softmax(-1)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        w, idx = probs[t].topk(moe.top_k)
        if moe.normalize_top_k:
            w = w / w.sum()
        for wi, e in zip(w, idx.tolist()):
            if kept is None or (t, e) in kept:
                out[t] += wi * expert_mlp(moe, e, flat[t])
    return out.view(s, b, d)


# 4 tokens whose router logits are logs of small integers (router weight = identity), so each
# softmax is those integers over their sum:
#   t0: [4, 2, 1, 1]/8  -> top-2 (0, 1), p = (1/2, 1/4),   renormalised (2/3, 1/3),  lse = ln 8
#   t1: [1, 1, 2, 4]/8  -> top-2 (3, 2), p = (1/2, 1/4),   renormalised (2/3, 1/3),  lse = ln 8
#   t2: [2, 1, 1, 4]/8  -> top-2 (3, 0), p = (1/2, 1/4),   renormalised (2/3, 1/3),  lse = ln 8
#   t3: [1, 2, 1, 12]/16 -> top-2 (3, 1), p = (3/4, 1/8),  renormalised (6/7, 1/7),  lse = ln 16
HAND = torch.tensor([[4, 2, 1, 1], [1, 1, 2, 4], [2, 1, 1, 4], [1, 2, 1, 12]], dtype=torch.float64)


@pytest.mark.parametrize("normalize", [False, True])
def test_router_by_hand(single_process, normalize):
    moe = make_moe(d=4, num_experts=4, top_k=2, normalize_top_k=normalize, aux_loss_coef=0.01, z_loss_coef=0.001)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))
    x = HAND.log().view(4, 1, 4)
    r = route(moe.router_logits(x.view(4, 4)), 2, normalize)
    assert r.experts.tolist() == [[0, 1], [3, 2], [3, 0], [3, 1]]
    if normalize:
        expected_w = [[2 / 3, 1 / 3]] * 3 + [[6 / 7, 1 / 7]]
    else:
        expected_w = [[1 / 2, 1 / 4]] * 3 + [[3 / 4, 1 / 8]]
    torch.testing.assert_close(r.weights, torch.tensor(expected_w, dtype=torch.float64))

    moe(x)
    # f_e: assignments per expert / (T k) = 8.  e0: t0, t2; e1: t0, t3; e2: t1; e3: t1, t2, t3.
    f = torch.tensor([2, 2, 1, 3], dtype=torch.float64) / 8
    torch.testing.assert_close(moe.last_load.double(), f)
    # P_e: mean softmax over the 4 tokens.
    #   P0 = (1/2 + 1/8 + 1/4 + 1/16) / 4 = 0.234375     P1 = (1/4 + 1/8 + 1/8 + 1/8) / 4 = 0.15625
    #   P2 = (1/8 + 1/4 + 1/8 + 1/16) / 4 = 0.140625     P3 = (1/8 + 1/2 + 1/2 + 3/4) / 4 = 0.46875
    P = torch.tensor([0.234375, 0.15625, 0.140625, 0.46875], dtype=torch.float64)
    torch.testing.assert_close(r.probs.mean(0), P)
    # aux = E sum_e f_e P_e = 4 (2 .234375 + 2 .15625 + .140625 + 3 .46875) / 8 = 2.328125 / 2
    aux = 1.1640625
    # z = mean lse^2 = (3 (3 ln2)^2 + (4 ln2)^2) / 4 = 43/4 ln2^2
    z = 43 / 4 * LN2**2
    assert moe.last_stats["aux_loss"] == pytest.approx(aux, rel=1e-12)
    assert moe.last_stats["z_loss"] == pytest.approx(z, rel=1e-12)
    assert moe.last_aux_loss.item() == pytest.approx(0.01 * aux + 0.001 * z, rel=1e-12)
    assert moe.last_stats["expert_load_max"] == pytest.approx(3 / 8)
    assert moe.last_stats["expert_load_min"] == pytest.approx(1 / 8)
    assert moe.last_stats["dropped_fraction"] == 0.0


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dropless_matches_per_token_reference(single_process, normalize, top_k):
    moe = make_moe(top_k=top_k, normalize_top_k=normalize)
    x = x_seq()
    torch.testing.assert_close(moe(x), reference(moe, x), rtol=1e-10, atol=1e-10)
    assert moe.last_stats["dropped_fraction"] == 0.0


def forced_router(moe):
    """Router on features 0-3 only: expert 0 gets logit 10 from feature 0; expert 1 + j gets 5 from feature 1 + j."""
    w = torch.zeros(4, moe.router.weight.shape[1], dtype=torch.float64)
    w[0, 0] = 10.0
    for j in range(3):
        w[1 + j, 1 + j] = 5.0
    with torch.no_grad():
        moe.router.weight.copy_(w)


def forced_tokens():
    """8 tokens ([s=4, b=2], flat index t = 2 s + b): all pick expert 0 first, then expert 1 + t % 3.
    Features 4-7 are random (the experts see different tokens) and the router ignores them."""
    x = x_seq(s=4, b=2)
    flat = x.view(8, 8)
    flat[:, :4] = 0.0
    flat[:, 0] = 1.0
    for t in range(8):
        flat[t, 1 + t % 3] = 1.0
    return x


def test_capacity_drops_later_tokens(single_process):
    moe = make_moe(top_k=2, capacity_factor=0.5)
    forced_router(moe)
    x = forced_tokens()
    y = moe(x).view(8, 8)
    # capacity = ceil(0.5 * 8 tokens * 2 / 4 experts) = 2, kept first come first served:
    #   e0 <- t0..t7 keeps t0, t1 (drops 6); e1 <- t0, t3, t6 keeps t0, t3 (drops t6);
    #   e2 <- t1, t4, t7 keeps t1, t4 (drops t7); e3 <- t2, t5 keeps both.   8 of 16 dropped.
    kept = {(0, 0), (1, 0), (0, 1), (3, 1), (1, 2), (4, 2), (2, 3), (5, 3)}
    torch.testing.assert_close(y, reference(moe, x, kept).view(8, 8), rtol=1e-10, atol=1e-10)
    assert moe.last_stats["dropped_fraction"] == 0.5
    assert torch.equal(y[6], torch.zeros(8, dtype=torch.float64))  # both assignments dropped
    assert torch.equal(y[7], torch.zeros(8, dtype=torch.float64))
    # the load counts routed assignments, before drops
    torch.testing.assert_close(moe.last_load, torch.tensor([8, 3, 3, 2], dtype=torch.float32) / 16)
    assert moe.last_stats["expert_load_max"] == 0.5


def test_large_capacity_equals_dropless(single_process):
    dropless, roomy = make_moe(), make_moe(capacity_factor=4.0)  # capacity = all T k assignments
    for m in (dropless, roomy):
        forced_router(m)
    x = forced_tokens()
    torch.testing.assert_close(roomy(x), dropless(x), rtol=0, atol=0)
    assert roomy.last_stats["dropped_fraction"] == 0.0
    x = x_seq()
    torch.testing.assert_close(roomy(x), dropless(x), rtol=0, atol=0)


def test_gradients_reach_router_and_experts(single_process):
    moe = make_moe(capacity_factor=None, z_loss_coef=0.01)
    x = x_seq().requires_grad_()
    # through the combine weights alone
    moe(x).square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0
    for name in ("gate_weight", "up_weight", "down_weight"):
        g = getattr(moe, name).grad
        used = moe.last_load > 0
        assert (g.flatten(1).abs().sum(1)[used] > 0).all(), name
    # through the auxiliary losses alone
    moe.zero_grad()
    moe(x)
    moe.last_aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.gate_weight.grad is None or moe.gate_weight.grad.abs().sum() == 0
    # exact gradients wrt the input and the router (routing is locally constant away from ties)
    small = make_moe(d=4, hidden=6, num_experts=3, top_k=2, z_loss_coef=0.1)

    def f(x, w_router, w_gate):
        out = torch.func.functional_call(small, {"router.weight": w_router, "gate_weight": w_gate}, (x,))
        return out.sum() + small.last_aux_loss

    inputs = (x_seq(s=3, b=2, d=4), small.router.weight.detach().clone(), small.gate_weight.detach().clone())
    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_() for t in inputs))


def test_last_load_sums_to_one_and_equals_counts(single_process):
    moe = make_moe(top_k=2, capacity_factor=0.75)
    x = x_seq()
    moe(x)
    experts = (x.view(-1, 8) @ moe.router.weight.T).topk(2).indices
    counts = torch.bincount(experts.flatten(), minlength=4)
    torch.testing.assert_close(moe.last_load, counts.float() / counts.sum())
    assert moe.last_load.sum().item() == pytest.approx(1.0)


def test_tensor_parallel_emulated(single_process):
    """Two TP ranks in one process: each holds a hidden shard, outputs are summed (the all-reduce),
    ``x``'s gradient is summed (``enter_tensor_parallel``) and so is the router's (partial). All three
    must equal the single-rank model, auxiliary-loss gradient included."""
    full = make_moe(z_loss_coef=0.05, aux_loss_coef=0.1)
    state = full_state_dict(full)
    ranks = []
    for r in range(2):
        dims = ParallelDims(tp=2, tp_rank=r)
        m = MoE(8, 16, 4, 2, init_std=0.5, out_std=0.5, dims=dims, z_loss_coef=0.05, aux_loss_coef=0.1).double()
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.copy_(shard_of(state[name], p, dims))
        ranks.append(m)
    assert ranks[0].router.weight.partial_grad_over_tp and not full.router.weight.partial_grad_over_tp
    assert ranks[0].down_weight.partition_dim == 2 and ranks[0].gate_weight.shape == (4, 8, 8)

    x = x_seq()
    target = torch.randn_like(x)
    x_ref = x.clone().requires_grad_()
    loss = (full(x_ref) * target).sum() + full.last_aux_loss
    loss.backward()

    xs = [x.clone().requires_grad_() for _ in ranks]
    y = sum(m(xr) for m, xr in zip(ranks, xs))
    # every rank backpropagates the same (replicated) loss: main part once through the sum, aux on each rank
    total = (y * target).sum() + sum(m.last_aux_loss for m in ranks)
    total.backward()
    torch.testing.assert_close(y, full(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xs[0].grad + xs[1].grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ranks[0].router.weight.grad + ranks[1].router.weight.grad, full.router.weight.grad,
                               rtol=1e-10, atol=1e-10)
    for name, dim in (("gate_weight", 1), ("up_weight", 1), ("down_weight", 2)):
        g = torch.cat([getattr(m, name).grad for m in ranks], dim=dim)
        torch.testing.assert_close(g, getattr(full, name).grad, rtol=1e-10, atol=1e-10)
    assert ranks[0].last_aux_loss.item() == pytest.approx(full.last_aux_loss.item(), rel=1e-12)


def test_step_and_state(single_process):
    moe = make_moe()
    x = x_seq(s=1)
    assert moe.init_state(2, 10) is None
    torch.testing.assert_close(moe.step(x, None, 0), moe(x))


def exported_form(moe, x):
    """The MoE's forward as ``torch.export`` sees it (the experts dense: ``MoE._exported``)."""
    flat = x.reshape(-1, x.shape[-1])
    return moe._exported(x, flat, route(moe.router_logits(flat), moe.top_k, moe.normalize_top_k))


def test_the_exported_dense_form_equals_dispatch_with_the_same_drops(single_process):
    # the hand case of test_capacity_drops_later_tokens: half the assignments dropped, first come first served
    moe = make_moe(top_k=2, capacity_factor=0.5)
    forced_router(moe)
    x = forced_tokens()
    kept = {(0, 0), (1, 0), (0, 1), (3, 1), (1, 2), (4, 2), (2, 3), (5, 3)}
    torch.testing.assert_close(exported_form(moe, x), reference(moe, x, kept), rtol=1e-10, atol=1e-10)
    for kw in ({}, {"normalize_top_k": True}, {"capacity_factor": 1.0, "shared_hidden": 8}):
        moe = make_moe(**kw)
        x = x_seq()
        torch.testing.assert_close(exported_form(moe, x), moe(x), rtol=1e-10, atol=1e-10)
