"""The Hyena operator (symbol ``H``): the FFT convolution equals the direct sum and the modal recurrence, the operator
follows its equations, decoding equals the forward pass, causality, packed documents, and its config's errors."""

import math

import pytest
import torch

from chimera.models.config import ModelConfig
from chimera.models.mixers.hyena import direct_long_conv, fft_long_conv, fit_modal, long_conv_within_documents
from chimera.models.spec import Build
from chimera.models.sublayer import build_mixer
from chimera.parallel.dims import ParallelDims
from chimera.parallel.sharding import initialize_parameters

FIELDS = dict(pattern="H", vocab_size=64, d_model=32, num_heads=4, init_std=0.2, hyena_filter_max_len=64)


def config(**overrides) -> ModelConfig:
    return ModelConfig(**{**FIELDS, **overrides})


def hyena(seed=0, symbol="H", **overrides):
    cfg = config(pattern=symbol, **overrides)
    m = build_mixer(symbol, cfg, Build.of(cfg, ParallelDims()))
    initialize_parameters(m, seed)
    return m.double()


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# (symbol, hyena_filter, order): H with either filter; StripedHyena 2's short explicit X and medium regularised D
KINDS = [("H", "implicit", 2), ("H", "implicit", 3), ("H", "modal", 2), ("H", "modal", 3), ("X", "implicit", 2),
         ("D", "implicit", 3)]
ALL = [("H", "implicit"), ("H", "modal"), ("X", "implicit"), ("D", "implicit")]


def test_fft_conv_equals_direct_sum():
    z, h = randn(37, 3, 5), randn(5, 40, seed=2)
    direct = torch.stack([sum(h[:, t - j] * z[j] for j in range(t + 1)) for t in range(37)])  # the definition
    torch.testing.assert_close(direct_long_conv(z, h), direct, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fft_long_conv(z, h), direct, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["implicit", "modal"])
def test_fft_conv_of_the_filter_equals_direct_sum(kind):
    m = hyena(hyena_filter=kind, hyena_order=3)
    h = m.filter(30)  # [2, c, 30]
    z = randn(30, 2, 32)
    for n in range(2):
        torch.testing.assert_close(fft_long_conv(z, h[n]), direct_long_conv(z, h[n]), rtol=1e-9, atol=1e-9)


def test_modal_fft_conv_equals_its_recurrence():
    """``h_t = Re(sum_m R_m p_m^t)`` convolved by FFT equals ``s_t = p s_{t-1} + z_t, y_t = Re(R . s_t)``, stepped."""
    m = hyena(hyena_filter="modal", hyena_state=3)
    p = torch.view_as_complex(m.filter.poles[0].contiguous())  # [c, S]
    r = torch.view_as_complex(m.filter.residues[0].contiguous())
    z = randn(50, 2, 32)
    s, ys = torch.zeros(2, 32, 3, dtype=torch.complex128), []
    for t in range(50):
        s = p * s + z[t].unsqueeze(-1)
        ys.append((r * s).sum(-1).real)
    torch.testing.assert_close(fft_long_conv(z, m.filter(50)[0]), torch.stack(ys), rtol=1e-9, atol=1e-9)
    powers = torch.stack([p**t for t in range(50)], -1)  # by repeated multiplication
    torch.testing.assert_close(m.filter(50)[0], (r.unsqueeze(-1) * powers).sum(-2).real, rtol=1e-9, atol=1e-12)


def test_implicit_filter_is_window_times_sine_mlp_of_positions():
    m = hyena(hyena_filter_emb=5, hyena_filter_width=8)
    f, T, length = m.filter, 64, 20
    rows = []
    for t in range(length):
        pe = torch.tensor([t / T] + [math.cos(2 * math.pi * k * t / T) for k in (1, 2)]
                          + [math.sin(2 * math.pi * k * t / T) for k in (1, 2)], dtype=torch.float64)
        a = pe
        for w, b, omega in zip(f.weights, f.biases, f.freqs):
            a = torch.sin(omega * (w @ a + b))
        alpha = torch.linspace(math.log(100) / 1.5, math.log(100) / 0.3, 32, dtype=torch.float64)
        rows.append(f.readout[0] @ a * torch.exp(-alpha * t / T))
    torch.testing.assert_close(f(length)[0], torch.stack(rows, -1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("symbol,kind,order", KINDS)
def test_operator_follows_its_equations(symbol, kind, order):
    """``z^1 = x^1 v``, ``z^{n+1} = x^{n+1} (h^n (*) z^n + D^n z^n)``, ``y = W_out z^N``, written with the direct sum
    and the projection's rows ``[heads, (x^N .. x^1, v), head_dim]``."""
    m = hyena(symbol=symbol, hyena_filter=kind, hyena_order=order, hyena_medium_filter_len=12)
    u = randn(24, 2, 32)
    p = m.short_conv(m.in_proj(u)).unflatten(-1, (4, order + 1, 8))
    x = {n: p[..., order - n, :].flatten(-2) for n in range(1, order + 1)}
    z = x[1] * p[..., order, :].flatten(-2)
    h = m.filter(24)
    for n in range(1, order):
        z = x[n + 1] * (direct_long_conv(z, h[n - 1]) + m.D[n - 1] * z)
    torch.testing.assert_close(m(u), m.out_proj(z), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("symbol,kind,order", KINDS)
def test_decoding_steps_equal_full_forward(symbol, kind, order):
    m = hyena(symbol=symbol, hyena_filter=kind, hyena_order=order, hyena_medium_filter_len=12)
    x = randn(40, 2, 32)
    full = m(x)
    state = m.init_state(batch=2, max_len=40)
    steps = torch.cat([m.step(x[t : t + 1], state, t) for t in range(40)])
    torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-9 * full.abs().max().item())


@pytest.mark.parametrize("symbol,kind", ALL)
def test_causality(symbol, kind):
    """A change at ``t`` moves no earlier output beyond the FFT's rounding (fp64: <= 1e-13 relative), and does move
    output ``t`` (the direct sum, exactly causal by construction, equals the FFT: above)."""
    m = hyena(symbol=symbol, hyena_filter=kind)
    x, t = randn(40, 2, 32), 23
    x2 = x.clone()
    x2[t] += randn(2, 32, seed=3)
    y, y2 = m(x), m(x2)
    scale = y.abs().max().item()
    assert (y[:t] - y2[:t]).abs().max() <= 1e-13 * scale
    assert (y[t] - y2[t]).abs().max() > 1e-3 * scale


def test_long_conv_within_documents_equals_documents_convolved_separately():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 2, 3, 3]]).t()  # [s, b]
    z, h = randn(10, 2, 3), randn(3, 10, seed=2)
    expected = torch.zeros_like(z)
    for b in range(2):
        for d in seg[:, b].unique():
            rows = (seg[:, b] == d).nonzero()[:, 0]
            expected[rows, b] = direct_long_conv(z[rows, b : b + 1], h)[:, 0]
    torch.testing.assert_close(long_conv_within_documents(z, h, seg), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("symbol,kind", ALL)
def test_packed_documents_equal_documents_run_separately(symbol, kind):
    from chimera.models.documents import PackedDocuments

    m = hyena(symbol=symbol, hyena_filter=kind, hyena_order=3, hyena_medium_filter_len=12)
    lengths = [7, 20, 1, 12]
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    x = randn(40, 1, 32)
    packed = m(x, PackedDocuments.from_batch(seg, pos))
    separate = torch.cat([m(part) for part in x.split(lengths)])
    torch.testing.assert_close(packed, separate, rtol=1e-10, atol=1e-12)
    assert (m(x) - separate).abs().max() > 1e-3 * separate.abs().max()  # unpacked, documents see each other


def test_modal_filter_carries_a_bounded_state():
    """The context-parallel rule ``state`` of the modal filter (the generic rule test covers the default, implicit)."""
    from chimera.models import registry

    cfg = config(hyena_filter="modal")
    assert registry.sublayers()["H"].context_parallel(cfg.sublayer("H")).needs == "state"
    assert registry.sublayers()["H"].context_parallel(config().sublayer("H")).needs == "keys_values"
    m = hyena(hyena_filter="modal")
    x = randn(24, 2, 32)
    x2 = x.clone()
    x2[0] += 1.0
    assert (m(x2)[20] - m(x)[20]).abs().max() > 1e-10
    sizes = [sum(v.numel() for v in m.init_state(2, n).values()) for n in (16, 64)]
    assert sizes[0] == sizes[1] > 0


def test_medium_filter_taps_decay_and_short_filter_taps_do_not():
    short = hyena(symbol="X")
    raw = short.filter.convs[0].weight
    torch.testing.assert_close(short.filter(10)[0], torch.nn.functional.pad(raw.flip(-1), (0, 3)), rtol=0, atol=0)
    medium = hyena(symbol="D", hyena_medium_filter_len=16)
    raw = medium.filter.convs[0].weight.flip(-1)  # [c, lag]
    beta = torch.linspace(math.log(100) / 1.5, math.log(100) / 0.3, 32, dtype=torch.float64)
    lag = torch.arange(16, dtype=torch.float64)
    torch.testing.assert_close(medium.filter(16)[0], raw * torch.exp(-beta[:, None] * lag / 16), rtol=1e-12, atol=0)


@pytest.mark.parametrize("overrides,message", [
    (dict(num_heads=5), "num_heads=5 must divide d_model=32"),
    (dict(hyena_filter_emb=8), "hyena_filter_emb=8 must be odd"),
    (dict(hyena_filter="fourier"), "hyena_filter"),
    (dict(hyena_order=1), "hyena_order"),
])
def test_bad_config_values_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides)


def test_tensor_parallel_split_must_divide_heads():
    cfg = config()
    assert "model.num_heads=4" in cfg.check_tensor_parallel(8)
    assert cfg.check_tensor_parallel(2) is None


def modal_taps(poles, residues, length):
    p, r = torch.view_as_complex(poles.contiguous()), torch.view_as_complex(residues.contiguous())
    return (r.unsqueeze(-1) * p.unsqueeze(-1) ** torch.arange(length, dtype=torch.float64)).sum(-2).real


def test_fit_modal_recovers_a_modal_filter_exactly():
    m = hyena(hyena_filter="modal", hyena_state=3)
    h = m.filter(64)[0]  # 3 complex modes = 6 real-signal modes (conjugate pairs)
    poles, residues = fit_modal(h, 6)
    torch.testing.assert_close(modal_taps(poles, residues, 64), h, rtol=1e-8, atol=1e-8 * h.abs().max().item())


def test_fit_modal_of_an_implicit_filter_has_a_measured_error():
    """The implicit filter is not a few modes: the fit's relative error (measured: 0.30 with 4 modes, 0.16 with 16,
    at 256 taps of a freshly initialised filter) falls with more modes but stays far above rounding, which is why
    the implicit filter decodes from an exact cache instead."""
    h = hyena(hyena_filter_max_len=256).filter(256)[0]
    errors = {}
    for modes in (4, 16):
        poles, residues = fit_modal(h, modes)
        errors[modes] = ((modal_taps(poles, residues, 256) - h).norm() / h.norm()).item()
    assert 1e-3 < errors[16] < errors[4]


def test_flops_per_token_counts_projections_and_the_fft():
    from chimera.models.flops import sublayer_flops

    def total(cfg, symbol, s):
        return sum(sublayer_flops(cfg, symbol, s).values())

    cfg = config()
    flops = total(cfg, "H", 1024)
    projections = 2 * (32 * 3 * 32 + 32 * 32 + 3 * 32 * 3)
    assert flops == pytest.approx(projections + 32 * (15 * 11 + 4) + 2 * 32)
    assert total(cfg, "H", 4096) > flops  # grows as log s
    x = total(config(pattern="X"), "X", 1024)
    assert x == pytest.approx(projections + 2 * 32 * 7 + 4 * 32 + 2 * 32)
