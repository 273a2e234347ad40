"""Every mixer: reference forward vs step-by-step decoding, causality, and the RG-LRU equations."""

import math

import pytest
import torch
import torch.nn.functional as F

from chimera.configs.loader import load_model_config
from chimera.models.mixers.rglru import GATE_C
from chimera.models.spec import Build
from chimera.models.sublayer import build_mixer
from chimera.parallel.dims import ParallelDims
from chimera.parallel.sharding import initialize_parameters
from helpers import assert_causal

SYMBOLS = ["R", "L", "*", "-", "B", "V", "W", "C"]


def make_mixer(symbol, seed=0, **overrides):
    cfg = load_model_config("griffin-tiny", [f"{k}={v}" for k, v in overrides.items()])
    mixer = build_mixer(symbol, cfg, Build.of(cfg, ParallelDims()))
    initialize_parameters(mixer, seed)
    return mixer.double(), cfg


def x_seq(s=40, b=2, d=64, seed=1):
    return torch.randn(s, b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_decoding_steps_equal_full_forward(single_process, symbol):
    mixer, cfg = make_mixer(symbol)  # window 16 < 40 tokens: the ring buffer wraps
    x = x_seq()
    full = mixer(x)
    state = mixer.init_state(batch=2, max_len=40)
    steps = torch.cat([mixer.step(x[t : t + 1], state, t) for t in range(40)])
    torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_causality(single_process, symbol):
    mixer, _ = make_mixer(symbol)
    assert_causal(mixer, x_seq())


def test_local_attention_sees_exactly_its_window(single_process):
    mixer, cfg = make_mixer("L")
    x = x_seq()
    t = 35
    for s, visible in ((t - cfg.window, False), (t - cfg.window + 1, True)):
        x2 = x.clone()
        x2[s] += 1.0
        changed = (mixer(x2)[t] - mixer(x)[t]).abs().max() > 1e-9
        assert bool(changed) == visible, (s, visible)


def test_attention_matches_explicit_softmax(single_process):
    mixer, cfg = make_mixer("L")
    x = x_seq(s=24)
    s, hd = 24, cfg.effective("head_dim")
    pos = torch.arange(s)
    q, k, v = mixer._project(x, pos)  # [b, h, s, d]; MQA: one kv head
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    diff = pos[:, None] - pos[None, :]
    scores = scores.masked_fill(~((diff >= 0) & (diff < cfg.window)), float("-inf"))
    o = (scores.softmax(-1) @ v).permute(2, 0, 1, 3).flatten(-2)
    torch.testing.assert_close(mixer(x), mixer.o_proj(o), rtol=1e-10, atol=1e-10)


def test_rglru_follows_the_paper_equations(single_process):
    """Eqs. (1)-(4) of arXiv 2402.19427 evaluated token by token in plain code."""
    mixer, cfg = make_mixer("R")
    lru = mixer.rglru
    width = cfg.effective("rnn_width")
    u = x_seq(s=12, d=width)
    H, bw = lru.heads_local, lru.block
    h = torch.zeros(2, width, dtype=torch.float64)
    expected = []
    for t in range(12):
        ut = u[t].view(2, H, bw)
        r = torch.sigmoid(torch.einsum("bhi,hij->bhj", ut, lru.gate_a_weight) + lru.gate_a_bias).reshape(2, -1)
        i = torch.sigmoid(torch.einsum("bhi,hij->bhj", ut, lru.gate_x_weight) + lru.gate_x_bias).reshape(2, -1)
        a = torch.sigmoid(lru.a_param) ** (GATE_C * r)
        h = a * h + torch.sqrt(1 - a**2) * (i * u[t])
        expected.append(h)
    torch.testing.assert_close(lru(u), torch.stack(expected), rtol=1e-9, atol=1e-9)


def test_rglru_decay_initialisation(single_process):
    mixer, _ = make_mixer("R")
    a_c = torch.sigmoid(mixer.rglru.a_param) ** GATE_C
    assert a_c.min() >= 0.9 - 1e-6 and a_c.max() <= 0.999 + 1e-6


def test_causal_conv_matches_definition(single_process):
    mixer, _ = make_mixer("R")
    conv = mixer.conv
    x = x_seq(s=10, d=conv.weight.shape[0])
    k = conv.kernel
    padded = F.pad(x, (0, 0, 0, 0, k - 1, 0))
    expected = torch.stack([(padded[t : t + k].permute(1, 2, 0) * conv.weight).sum(-1) + conv.bias for t in range(10)])
    torch.testing.assert_close(conv(x), expected, rtol=1e-10, atol=1e-10)
