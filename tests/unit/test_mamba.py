"""The Mamba-1 mixer: the equations token by token, decoding, causality, packing, and HF transformers; plain,
with Jamba's dt/B/C norms, and with Zamba's independent heads."""

import math

import pytest
import torch
import torch.nn.functional as F

from chimera.models.documents import PackedDocuments
from chimera.models.mixers.mamba import MambaMixer
from chimera.parallel.dims import ParallelDims
from chimera.parallel.sharding import initialize_parameters
from helpers import assert_causal

D_MODEL, D_STATE, D_CONV, EXPAND = 32, 8, 4, 2
VARIANTS = {"mamba": {}, "jamba": dict(dt_bc_norm=True, norm_eps=1e-5), "zamba": dict(heads=4)}


def make_mixer(seed=0, dtype=torch.float64, **overrides):
    kw = dict(d_state=D_STATE, d_conv=D_CONV, expand=EXPAND, init_std=0.2, out_std=0.2) | overrides
    mixer = MambaMixer(D_MODEL, **kw, dims=ParallelDims())
    initialize_parameters(mixer, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # move off the structured init so that every term of the equations matters
        norms = (mixer.dt_layernorm.weight, mixer.b_layernorm.weight, mixer.c_layernorm.weight) \
            if mixer.dt_bc_norm else ()
        for p in (mixer.A_log, mixer.D, mixer.dt_proj.bias, mixer.conv1d.bias, *norms):
            if isinstance(p, torch.nn.Parameter):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        mixer.dt_proj.bias.add_(2.0)  # Delta ~ 0.01..1: the state decays noticeably within 40 tokens
    return mixer.to(dtype)


def x_seq(s=40, b=2, d=D_MODEL, seed=1, dtype=torch.float64):
    return torch.randn(s, b, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rms_norm(v: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)


def selection(m: MambaMixer, u: torch.Tensor, head: int):
    """dt (before dt_proj), B, C of one head's channels ``u [b, P]``, from the weights."""
    if not m.multi_head:
        return torch.split(u @ m.x_proj.weight.t(), [m.dt_rank, m.d_state, m.d_state], dim=-1)
    return torch.split(u @ m.x_proj_weight[head].t(), [m.dt_rank, m.d_state, m.d_state], dim=-1)


def per_token_reference(m: MambaMixer, x: torch.Tensor) -> torch.Tensor:
    """Algorithm 2 of arXiv 2312.00752 (as in HF's slow path), one token at a time, from the weights;
    with ``dt_bc_norm``, Jamba's RMSNorms of dt, B and C (arXiv 2403.19887) right after x_proj; with heads,
    Zamba's (arXiv 2405.16712): each head's channels an independent Mamba with its own x_proj and dt_proj."""
    s, b, _ = x.shape
    c, k = m.conv1d.weight.shape
    N, P = m.d_state, m.head_dim
    A = -torch.exp(m.A_log)  # [c, N]
    window = torch.zeros(b, c, k, dtype=x.dtype)
    h = torch.zeros(b, c, N, dtype=x.dtype)
    out = []
    for t in range(s):
        xt = x[t] @ m.in_proj_x.weight.t()
        zt = x[t] @ m.in_proj_z.weight.t()
        window = torch.cat([window[..., 1:], xt.unsqueeze(-1)], dim=-1)
        u = F.silu((window * m.conv1d.weight).sum(-1) + m.conv1d.bias)  # [b, c]
        y = torch.zeros_like(u)
        for head in range(c // P):
            ch = slice(head * P, (head + 1) * P)
            dt, B, C = selection(m, u[:, ch], head)
            if m.dt_bc_norm:
                dt, B, C = (rms_norm(v, norm.weight, norm.eps) for v, norm in
                            ((dt, m.dt_layernorm), (B, m.b_layernorm), (C, m.c_layernorm)))
            delta = F.softplus(dt @ m.dt_proj.weight[ch].t() + m.dt_proj.bias[ch])  # [b, P]
            for i, d in enumerate(range(ch.start, ch.stop)):  # every channel its own N-dimensional SSM
                A_bar = torch.exp(delta[:, i, None] * A[d])  # [b, N]
                h[:, d] = A_bar * h[:, d] + delta[:, i, None] * B * u[:, d, None]
            y[:, ch] = (h[:, ch] * C[:, None, :]).sum(-1) + m.D[ch] * u[:, ch]
        out.append((y * F.silu(zt)) @ m.out_proj.weight.t())
    return torch.stack(out)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_follows_the_equations(single_process, variant):
    mixer = make_mixer(**VARIANTS[variant])
    x = x_seq(s=12)
    torch.testing.assert_close(mixer(x), per_token_reference(mixer, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoding_steps_equal_full_forward(single_process, variant):
    mixer = make_mixer(**VARIANTS[variant])
    x = x_seq()
    full = mixer(x)
    state = mixer.init_state(batch=2, max_len=40)
    steps = torch.cat([mixer.step(x[t : t + 1], state, t) for t in range(40)])
    torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-9)
    assert state["h"].shape == (2, EXPAND * D_MODEL, D_STATE) and state["conv"].shape == (2, EXPAND * D_MODEL, 3)


@pytest.mark.parametrize("variant", ["mamba", "zamba"])
def test_causality(single_process, variant):
    assert_causal(make_mixer(**VARIANTS[variant]), x_seq())


@pytest.mark.parametrize("variant", ["mamba", "zamba"])
def test_packed_documents_equal_separate_runs(single_process, variant):
    mixer = make_mixer(**VARIANTS[variant])
    lengths = [[5, 17, 1, 9], [12, 2, 18]]  # two sequences of 32, documents packed differently
    x = x_seq(s=32)
    seg = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths])
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    docs = PackedDocuments.from_batch(seg, pos)
    packed = mixer(x, docs)
    for i, row in enumerate(lengths):
        bounds = [0, *torch.tensor(row).cumsum(0).tolist()]
        separate = torch.cat([mixer(x[a:e, i : i + 1]) for a, e in zip(bounds[:-1], bounds[1:], strict=True)])
        torch.testing.assert_close(packed[:, i : i + 1], separate, rtol=1e-10, atol=1e-10)
    assert (mixer(x) - packed).abs().max() > 1e-3  # without boundaries, documents do see each other


def test_initialisation(single_process):
    mixer = MambaMixer(D_MODEL, D_STATE, D_CONV, EXPAND, init_std=0.02, out_std=0.01, dims=ParallelDims())
    initialize_parameters(mixer, 0)
    assert mixer.dt_rank == math.ceil(D_MODEL / 16)
    expected_a = torch.log(torch.arange(1, D_STATE + 1, dtype=torch.float32)).expand(EXPAND * D_MODEL, -1)
    torch.testing.assert_close(mixer.A_log, expected_a)  # S4D-real: A = -(1..N)
    torch.testing.assert_close(mixer.D, torch.ones(EXPAND * D_MODEL))
    delta = F.softplus(mixer.dt_proj.bias)
    assert delta.min() >= 1e-3 * (1 - 1e-5) and delta.max() <= 1e-1 * (1 + 1e-5)
    assert delta.max() / delta.min() > 10  # log-uniform over the range, not a constant
    bound = mixer.dt_rank**-0.5
    assert mixer.dt_proj.weight.abs().max() <= bound
    assert not mixer.A_log.weight_decay and not mixer.D.weight_decay


def test_bf16_runs_with_an_fp32_recurrence(single_process):
    mixer = make_mixer(dtype=torch.float32)
    x = x_seq(s=16, dtype=torch.float32)
    ref = mixer(x)
    mixer = mixer.to(torch.bfloat16)
    y = mixer(x.bfloat16())
    state = mixer.init_state(batch=2, max_len=16)
    step = mixer.step(x[:1].bfloat16(), state, 0)
    assert y.dtype == step.dtype == torch.bfloat16 and state["h"].dtype == torch.float32
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("bias,conv_bias", [(False, True), (True, False)])
def test_matches_hf_transformers(single_process, bias, conv_bias):
    import transformers
    from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer

    dt_rank = 4
    mixer = make_mixer(dtype=torch.float32, dt_rank=dt_rank, bias=bias, conv_bias=conv_bias)
    with torch.no_grad():
        if bias:
            for lin in (mixer.in_proj_x, mixer.in_proj_z, mixer.out_proj):
                lin.bias.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(7))
    config = transformers.MambaConfig(hidden_size=D_MODEL, state_size=D_STATE, expand=EXPAND, conv_kernel=D_CONV,
                                      time_step_rank=dt_rank, use_bias=bias, use_conv_bias=conv_bias,
                                      num_hidden_layers=1)
    hf = HFMambaMixer(config, layer_idx=0).eval()
    ours = {
        "in_proj.weight": torch.cat([mixer.in_proj_x.weight, mixer.in_proj_z.weight]),
        "conv1d.weight": mixer.conv1d.weight.unsqueeze(1),
        "x_proj.weight": mixer.x_proj.weight,
        "dt_proj.weight": mixer.dt_proj.weight,
        "dt_proj.bias": mixer.dt_proj.bias,
        "A_log": mixer.A_log,
        "D": mixer.D,
        "out_proj.weight": mixer.out_proj.weight,
    }
    if conv_bias:
        ours["conv1d.bias"] = mixer.conv1d.bias
    if bias:
        ours["in_proj.bias"] = torch.cat([mixer.in_proj_x.bias, mixer.in_proj_z.bias])
        ours["out_proj.bias"] = mixer.out_proj.bias
    hf.load_state_dict({k: v.detach().clone() for k, v in ours.items()}, strict=True)

    x = x_seq(s=24, dtype=torch.float32)
    with torch.no_grad():
        expected = hf(x.transpose(0, 1)).transpose(0, 1)  # HF: [b, s, d]
        got = mixer(x)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max() <= 1e-5


def test_matches_hf_jamba_mamba_mixer(single_process):
    """``dt_bc_norm``: HF's ``JambaMambaMixer`` (dt/B/C RMSNorms after x_proj), forward and decoding."""
    import transformers
    from transformers.models.jamba.modeling_jamba import JambaMambaMixer

    dt_rank, eps = 4, 1e-5
    mixer = make_mixer(dtype=torch.float32, dt_rank=dt_rank, dt_bc_norm=True, norm_eps=eps)
    config = transformers.JambaConfig(hidden_size=D_MODEL, mamba_d_state=D_STATE, mamba_expand=EXPAND,
                                      mamba_d_conv=D_CONV, mamba_dt_rank=dt_rank, rms_norm_eps=eps,
                                      num_hidden_layers=1, num_experts=1)
    hf = JambaMambaMixer(config, layer_idx=0).eval()
    ours = {k: v for k, v in mixer.named_parameters() if not k.startswith(("in_proj", "conv1d.weight"))}
    ours["in_proj.weight"] = torch.cat([mixer.in_proj_x.weight, mixer.in_proj_z.weight])
    ours["conv1d.weight"] = mixer.conv1d.weight.unsqueeze(1)
    hf.load_state_dict({k: v.detach().clone() for k, v in ours.items()}, strict=True)

    x = x_seq(s=24, dtype=torch.float32)
    with torch.no_grad():
        expected = hf(x.transpose(0, 1)).transpose(0, 1)  # HF: [b, s, d]
        got = mixer(x)
        state = mixer.init_state(batch=2, max_len=24)
        steps = torch.cat([mixer.step(x[t : t + 1], state, t) for t in range(24)])
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max() <= 1e-5
    assert (steps - expected).abs().max() <= 1e-5


def test_dt_bc_norm_has_hf_arithmetic_in_bf16(single_process):
    """Normalised in fp32, cast to bf16, then scaled in bf16 (HF ``JambaRMSNorm``): bit for bit."""
    from transformers.models.jamba.modeling_jamba import JambaRMSNorm

    mixer = make_mixer(dtype=torch.bfloat16, dt_bc_norm=True, norm_eps=1e-6)
    norm = mixer.b_layernorm
    hf = JambaRMSNorm(D_STATE, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(norm.weight)
    v = torch.randn(64, D_STATE, generator=torch.Generator().manual_seed(2)).mul(3).bfloat16()
    with torch.no_grad():
        assert norm(v).dtype == torch.bfloat16
        assert torch.equal(norm(v), hf(v))
    assert all(getattr(n.weight, "partial_grad_over_tp", None) is False  # replicated; partial only when tp > 1
               for n in (mixer.dt_layernorm, mixer.b_layernorm, mixer.c_layernorm))


def test_matches_hf_zamba_mamba_mixer(single_process):
    """``heads``: HF's ``ZambaMambaMixer`` (per-head x_proj/dt_proj, in_proj rows interleaving x and z)."""
    import transformers
    from transformers.models.zamba.modeling_zamba import ZambaMambaMixer

    heads, dt_rank = 4, 4
    mixer = make_mixer(dtype=torch.float32, dt_rank=dt_rank, heads=heads)
    config = transformers.ZambaConfig(hidden_size=D_MODEL, mamba_d_state=D_STATE, mamba_expand=EXPAND,
                                      mamba_d_conv=D_CONV, mamba_dt_rank=dt_rank, n_mamba_heads=heads,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
    hf = ZambaMambaMixer(config, layer_idx=0).eval()
    per_head = lambda t: t.detach().unflatten(0, (heads, -1)).clone()  # noqa: E731  [H P, ...] -> [H, P, ...]
    hf.load_state_dict({
        "in_proj.weight": torch.stack([mixer.in_proj_x.weight, mixer.in_proj_z.weight], dim=1).flatten(0, 1).detach(),
        "conv1d.weight": mixer.conv1d.weight.detach().unsqueeze(1), "conv1d.bias": mixer.conv1d.bias.detach(),
        "x_proj_weight": mixer.x_proj_weight.detach(), "dt_proj_weight": per_head(mixer.dt_proj.weight),
        "dt_proj_bias": per_head(mixer.dt_proj.bias), "A_log": per_head(mixer.A_log), "D": per_head(mixer.D),
        "out_proj.weight": mixer.out_proj.weight.detach(),
    }, strict=True)
    x = x_seq(s=24, dtype=torch.float32)
    with torch.no_grad():
        expected = hf(x.transpose(0, 1)).transpose(0, 1)  # HF: [b, s, d]
        got = mixer(x)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max() <= 1e-5
