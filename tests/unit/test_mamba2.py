"""Mamba-2 (SSD): chunked forward vs the equations token by token, decoding, causality, packed
documents, initialisation, and agreement with HF transformers' ``Mamba2Mixer``."""

import math

import pytest
import torch
import torch.nn.functional as F

from chimera.models.documents import PackedDocuments
from chimera.models.mixers.mamba2 import Mamba2Mixer
from chimera.parallel.dims import ParallelDims
from chimera.parallel.sharding import initialize_parameters
from helpers import assert_causal

D_MODEL, D_STATE, HEAD_DIM, N_GROUPS, D_CONV, CHUNK = 64, 16, 16, 2, 4, 16  # 8 heads, 4 per group


def make_mixer(seed=0, dtype=torch.float64, **overrides):
    kw = dict(d_state=D_STATE, d_conv=D_CONV, expand=2, head_dim=HEAD_DIM, n_groups=N_GROUPS, chunk_size=CHUNK,
              init_std=0.1, out_std=0.05, dims=ParallelDims())
    kw.update(overrides)
    mixer = Mamba2Mixer(D_MODEL, **kw)
    initialize_parameters(mixer, seed)
    with torch.no_grad():  # move the ones/zeros off their initial values so every parameter is exercised
        g = torch.Generator().manual_seed(seed + 100)
        for name, p in mixer.named_parameters():
            if p.dim() == 1 and name != "A_log":
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return mixer.to(dtype)


def x_seq(s=40, b=2, seed=1, dtype=torch.float64):
    return torch.randn(s, b, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def linear(layer, u):
    y = u @ layer.weight.T
    return y if layer.bias is None else y + layer.bias


def equations_token_by_token(m, x):
    """Mamba-2 written out one token and one head at a time, from the weights alone."""
    s, b, _ = x.shape
    H, P, N, G = m.heads_local, HEAD_DIM, D_STATE, N_GROUPS
    per_group = H // G
    k = m.conv_x.weight.shape[1]
    win_x = torch.zeros(b, H * P, k, dtype=x.dtype)
    win_bc = torch.zeros(b, 2 * G * N, k, dtype=x.dtype)
    h = torch.zeros(b, H, P, N, dtype=x.dtype)
    out = []
    for t in range(s):
        u = x[t]
        z, xs, bc, dt = (linear(p, u) for p in (m.in_proj_z, m.in_proj_x, m.in_proj_bc, m.in_proj_dt))
        win_x = torch.cat([win_x[..., 1:], xs.unsqueeze(-1)], -1)
        win_bc = torch.cat([win_bc[..., 1:], bc.unsqueeze(-1)], -1)
        xs = F.silu((win_x * m.conv_x.weight).sum(-1) + m.conv_x.bias).view(b, H, P)
        bc = F.silu((win_bc * m.conv_bc.weight).sum(-1) + m.conv_bc.bias).view(b, G, 2, N)  # [G, (B, C), N]
        y = torch.zeros(b, H, P, dtype=x.dtype)
        for hd in range(H):
            B_t, C_t = bc[:, hd // per_group, 0], bc[:, hd // per_group, 1]  # the head's group's B, C
            dt_h = F.softplus(dt[:, hd] + m.dt_bias[hd])  # [b]
            a = torch.exp(-torch.exp(m.A_log[hd]) * dt_h)
            h[:, hd] = a[:, None, None] * h[:, hd] + dt_h[:, None, None] * xs[:, hd, :, None] * B_t[:, None, :]
            y[:, hd] = (h[:, hd] @ C_t.unsqueeze(-1)).squeeze(-1) + m.D[hd] * xs[:, hd]
        gated = (y.reshape(b, H * P) * F.silu(z)).view(b, G, -1)  # RMSNorm per group of d_inner / G channels
        normed = gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + m.norm_eps)
        out.append(linear(m.out_proj, normed.reshape(b, -1) * m.norm_weight))
    return torch.stack(out)


def test_chunked_forward_equals_equations(single_process):
    m = make_mixer()
    x = x_seq(s=37)  # three chunks, the last one partial
    torch.testing.assert_close(m(x), equations_token_by_token(m, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_decoding_steps_equal_full_forward(single_process, chunk_size):
    m = make_mixer(chunk_size=chunk_size)
    x = x_seq()  # 40 tokens: not a multiple of either chunk size
    full = m(x)
    state = m.init_state(batch=2, max_len=40)
    steps = torch.cat([m.step(x[t : t + 1], state, t) for t in range(40)])
    torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-9)
    assert state["ssm"].shape == (2, 8, HEAD_DIM, D_STATE)


def test_causality(single_process):
    t = 23
    y, y2 = assert_causal(make_mixer(), x_seq(), t)
    assert (y[t:] - y2[t:]).abs().amax(dim=(1, 2)).min() > 1e-6  # and it reaches every later token


def test_packed_documents_equal_documents_run_separately(single_process):
    m = make_mixer()
    lengths = [[10, 17, 13], [16, 24]]  # a boundary inside a chunk, and one on a chunk boundary
    seg = torch.tensor([sum(([i] * n for i, n in enumerate(row)), []) for row in lengths])  # [b, s]
    pos = torch.tensor([sum((list(range(n)) for n in row), []) for row in lengths])
    docs = PackedDocuments.from_batch(seg, pos)
    x = x_seq().requires_grad_()
    packed = m(x, docs)
    for i, row in enumerate(lengths):
        start = 0
        for n in row:
            alone = m(x[start : start + n, i : i + 1])
            torch.testing.assert_close(packed[start : start + n, i : i + 1], alone, rtol=1e-9, atol=1e-9)
            start += n
    packed.square().sum().backward()  # the -inf log-decays at document starts give finite gradients
    for name, p in m.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    assert torch.isfinite(x.grad).all()


def test_initialisation(single_process):
    m = Mamba2Mixer(D_MODEL, d_state=D_STATE, head_dim=HEAD_DIM, n_groups=N_GROUPS, init_std=0.02, out_std=0.01,
                    dims=ParallelDims())
    initialize_parameters(m, 0)
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1.0, 9.0)))
    torch.testing.assert_close(m.D, torch.ones(8))
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert not any(p.weight_decay for p in (m.A_log, m.D, m.dt_bias, m.norm_weight))


def test_bf16_activations_keep_the_recurrence_in_fp32(single_process):
    m = make_mixer(dtype=torch.float32)
    x = x_seq(dtype=torch.float32)
    ref = m(x)
    y = m.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_invalid_shapes_are_rejected(single_process):
    with pytest.raises(ValueError, match="head_dim"):
        Mamba2Mixer(D_MODEL, head_dim=48, init_std=0.02, out_std=0.01, dims=ParallelDims())
    with pytest.raises(ValueError, match="n_groups"):
        Mamba2Mixer(D_MODEL, head_dim=HEAD_DIM, n_groups=3, init_std=0.02, out_std=0.01, dims=ParallelDims())


@pytest.mark.parametrize("conv_bias,bias", [(True, False), (False, True)])
def test_matches_hf_transformers(single_process, conv_bias, bias):
    from transformers import Mamba2Config
    from transformers.models.mamba2 import modeling_mamba2 as modeling

    m = make_mixer(dtype=torch.float32, conv_bias=conv_bias, bias=bias)
    n_heads = 2 * D_MODEL // HEAD_DIM
    cfg = Mamba2Config(hidden_size=D_MODEL, state_size=D_STATE, expand=2, head_dim=HEAD_DIM, n_groups=N_GROUPS,
                       conv_kernel=D_CONV, chunk_size=CHUNK, use_bias=bias, use_conv_bias=conv_bias,
                       num_heads=n_heads, layer_norm_epsilon=m.norm_eps)
    hf = modeling.Mamba2Mixer(cfg, layer_idx=0).eval()

    def hf_order(t):  # ours [G, (B, C), N, ...] -> HF's [B (G, N), C (G, N)] along dim 0
        t = t.unflatten(0, (N_GROUPS, 2, D_STATE))
        return torch.cat([t[:, 0].flatten(0, 1), t[:, 1].flatten(0, 1)])

    projections = (m.in_proj_z, m.in_proj_x, m.in_proj_bc, m.in_proj_dt)
    with torch.no_grad():
        hf.in_proj.weight.copy_(torch.cat([m.in_proj_z.weight, m.in_proj_x.weight, hf_order(m.in_proj_bc.weight),
                                           m.in_proj_dt.weight]))
        hf.conv1d.weight.copy_(torch.cat([m.conv_x.weight, hf_order(m.conv_bc.weight)]).unsqueeze(1))
        if conv_bias:
            hf.conv1d.bias.copy_(torch.cat([m.conv_x.bias, hf_order(m.conv_bc.bias)]))
        if bias:
            hf.in_proj.bias.copy_(torch.cat([p.bias if p is not m.in_proj_bc else hf_order(p.bias)
                                             for p in projections]))
            hf.out_proj.bias.copy_(m.out_proj.bias)
        for name in ("dt_bias", "A_log", "D"):
            getattr(hf, name).copy_(getattr(m, name))
        hf.norm.weight.copy_(m.norm_weight)
        hf.out_proj.weight.copy_(m.out_proj.weight)

    x = x_seq(dtype=torch.float32)  # [s, b, d]; HF takes [b, s, d]
    with torch.no_grad():
        ours, theirs = m(x), hf(x.transpose(0, 1)).transpose(0, 1)
    assert theirs.abs().max() > 1e-2  # a non-trivial output
    assert (ours - theirs).abs().max() <= 1e-4


def test_segsum_is_exact_with_document_starts():
    from chimera.models.mixers.mamba2 import segsum

    log_a = torch.tensor([-0.5, -math.inf, -0.25, -1.0], dtype=torch.float64)
    out = segsum(log_a)
    for i in range(4):
        for j in range(4):
            expected = log_a[j + 1 : i + 1].sum() if i >= j else -math.inf
            assert out[i, j] == expected, (i, j)


@pytest.mark.parametrize("heads,groups,tp", [(8, 2, 1), (8, 1, 2), (8, 2, 2), (8, 4, 2), (8, 2, 4), (8, 8, 4),
                                             (6, 3, 2), (12, 2, 4)])
def test_groups_of_a_ranks_heads_equal_the_vectors_of_each_head(heads, groups, tp):
    """What ``ssd`` reads per group (``_groups_of_local_heads``: whole groups, one group split by TP, or heads that
    straddle groups) repeated over the heads of each group equals each local head's own vector, on every rank."""
    for rank in range(tp):
        m = Mamba2Mixer(heads * 4 // 2, d_state=3, head_dim=4, n_groups=groups, init_std=0.1, out_std=0.1,
                        dims=ParallelDims(tp=tp, tp_rank=rank))
        t = torch.randn(5, m.n_slots, 1, 3)
        per_head, per_group = m._heads_of_groups(t), m._groups_of_local_heads(t)
        assert m.heads_local % per_group.shape[-2] == 0
        torch.testing.assert_close(per_group.repeat_interleave(m.heads_local // per_group.shape[-2], -2), per_head,
                                   rtol=0, atol=0)


def test_ssd_with_a_groups_b_and_c_equals_them_repeated_for_its_heads():
    """``ssd`` reading ``B, C`` once per group of heads equals it reading each head's copy: outputs and gradients."""
    from chimera.models.mixers.mamba2 import ssd

    gen = torch.Generator().manual_seed(0)
    s, b, h, p, n, g = 37, 2, 6, 4, 5, 2
    x = torch.randn(s, b, h, p, generator=gen, dtype=torch.float64, requires_grad=True)
    dt = (0.05 + 0.2 * torch.rand(s, b, h, generator=gen, dtype=torch.float64)).requires_grad_()
    A = -torch.rand(h, generator=gen, dtype=torch.float64) - 0.5
    B, C = (torch.randn(s, b, g, n, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    reset = torch.rand(s, b, generator=gen) < 0.1
    got = ssd(x, dt, A, B, C, 16, reset)
    want = ssd(x, dt, A, B.repeat_interleave(h // g, 2), C.repeat_interleave(h // g, 2), 16, reset)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad(got, (x, dt, B, C), grad), torch.autograd.grad(want, (x, dt, B, C), grad)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_chunk_decay_equals_the_exp_of_segsum_with_document_starts(dtype, tol):
    """``chunk_decay`` (differences of one cumulative sum, masked by document) equals ``exp(segsum)`` (the masked
    cumulative sums): values and the gradient of log a, with documents starting mid-chunk and at its first token."""
    from chimera.models.mixers.mamba2 import chunk_decay, segsum

    gen = torch.Generator().manual_seed(0)
    log_a = -2.0 * torch.rand(3, 4, 64, generator=gen, dtype=torch.float64)
    log_a[0, 1, 10] = log_a[1, 2, 0] = log_a[2, 3, 63] = log_a[2, 0, 30] = log_a[2, 0, 31] = -math.inf
    log_a = log_a.to(dtype).requires_grad_()
    got, want = chunk_decay(log_a), torch.exp(segsum(log_a))
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    grad = torch.rand(got.shape, generator=gen, dtype=torch.float64).to(dtype)
    (g_got,), (g_want,) = torch.autograd.grad(got, log_a, grad), torch.autograd.grad(want, log_a, grad)
    assert torch.isfinite(g_got).all()
    torch.testing.assert_close(g_got, g_want, rtol=tol * 10, atol=tol * 10)
    assert (g_got[..., 0] == 0).all()  # no product includes a chunk's first entry
