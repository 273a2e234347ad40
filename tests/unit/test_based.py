"""Based (arXiv 2402.18668): the Taylor feature map, the parallel, chunked and recurrent forms equal to each other and
to the recurrence run token by token, decoding, causality, document resets, BaseConv, and fla's reference ops."""

import importlib.metadata
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from chimera.configs.loader import load_model_config
from chimera.models.config import ModelConfig
from chimera.models.mixers.based import (
    based_chunked,
    based_parallel,
    based_recurrent,
    expanded_dim,
    taylor_features,
    taylor_kernel,
)
from chimera.models.spec import Build
from chimera.models.sublayer import build_mixer
from chimera.parallel.dims import ParallelDims
from chimera.parallel.sharding import initialize_parameters
from helpers import assert_causal, build_model


def make_mixer(symbol, seed=0, dtype=torch.float64, **overrides):
    cfg = load_model_config("based-tiny", [f"{k}={v}" for k, v in overrides.items()])
    mixer = build_mixer(symbol, cfg, Build.of(cfg, ParallelDims()))
    initialize_parameters(mixer, seed)
    return mixer.to(dtype), cfg


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def qkv(s=37, b=2, h=3, f=4, p=5, seed=0):
    return randn(s, b, h, f, seed=seed), randn(s, b, h, f, seed=seed + 1), randn(s, b, h, p, seed=seed + 2)


def resets(s=37, b=2):
    reset = torch.zeros(s, b, dtype=torch.bool)
    reset[5, 0] = reset[16, 0] = reset[30, 0] = True  # 16: a chunk's first token at chunk 8 and 16
    reset[17, 1] = reset[18, 1] = True  # a one-token document
    return reset


def recurrence_token_by_token(q, k, v, reset=None, eps=1e-6):
    """The definition, one token at a time: S += phi(k_t) v_t^T, z += phi(k_t), o_t = phi(q_t) S / (phi(q_t) z + eps);
    S and z dropped at a document's first token."""
    s, b, h, _ = q.shape
    D = expanded_dim(q.shape[-1])
    S = torch.zeros(b, h, D, v.shape[-1], dtype=q.dtype)
    z = torch.zeros(b, h, D, dtype=q.dtype)
    out = []
    for t in range(s):
        if reset is not None:
            keep = (~reset[t]).to(q.dtype)[:, None, None]
            S, z = S * keep[..., None], z * keep
        fq, fk = taylor_features(q[t]), taylor_features(k[t])
        S = S + fk[..., :, None] * v[t][..., None, :]
        z = z + fk
        num = torch.einsum("bhd,bhdp->bhp", fq, S)
        den = (fq * z).sum(-1, keepdim=True)
        out.append(num / (den + eps))
    return torch.stack(out)


def test_taylor_feature_map_is_the_second_order_expansion_of_exp():
    """phi(x) . phi(y) = 1 + a + a^2/2 with a = x.y / sqrt(f): the Taylor series of exp(a) to 2nd order, written out."""
    f = 16
    x, y = randn(5, f, seed=1), randn(7, f, seed=2)
    fx = taylor_features(x)
    assert fx.shape == (5, 1 + f + f * f) and torch.equal(fx[:, 0], torch.ones(5, dtype=x.dtype))
    torch.testing.assert_close(fx[:, 1:1 + f], x / f ** 0.25, rtol=0, atol=0)
    a = x @ y.t() / math.sqrt(f)
    expansion = 1 + a + a ** 2 / 2
    torch.testing.assert_close(fx @ taylor_features(y).t(), expansion, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(taylor_kernel(x, y), expansion, rtol=1e-12, atol=1e-12)
    small = 1e-2 * a  # near 0 the kernel is exp to third order
    assert (1 + small + small ** 2 / 2 - small.exp()).abs().max() < (small.abs() ** 3).max()
    assert taylor_kernel(x, y).min() >= 0.5  # ((1 + a)^2 + 1) / 2: the normaliser never vanishes


@pytest.mark.parametrize("documents", [False, True])
def test_parallel_chunked_and_recurrent_forms_equal_the_recurrence(documents):
    q, k, v = qkv()
    reset = resets() if documents else None
    reference = recurrence_token_by_token(q, k, v, reset)
    torch.testing.assert_close(based_parallel(q, k, v, reset), reference, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(based_recurrent(q, k, v, reset), reference, rtol=1e-9, atol=1e-9)
    for chunk in (1, 5, 8, 16, 37, 64):  # dividing the length or not, one chunk or many
        torch.testing.assert_close(based_chunked(q, k, v, chunk, reset), reference, rtol=1e-9, atol=1e-9)


def test_a_document_start_drops_everything_before_it():
    q, k, v = qkv()
    reset = resets()
    out = based_chunked(q, k, v, 8, reset)
    # tokens 16..29 of row 0 form one document: alone, they give the same outputs
    alone = based_chunked(q[16:30, :1], k[16:30, :1], v[16:30, :1], 8)
    torch.testing.assert_close(out[16:30, :1], alone, rtol=1e-12, atol=1e-12)
    assert (based_chunked(q, k, v, 8)[16:30, :1] - alone).abs().max() > 1e-3


def test_mixer_decoding_steps_equal_full_forward(single_process):
    for symbol in "BV":
        mixer, _ = make_mixer(symbol)  # chunk 16 < 40 tokens: several chunks
        x = randn(40, 2, 64, seed=3)
        full = mixer(x)
        state = mixer.init_state(batch=2, max_len=40)
        steps = torch.cat([mixer.step(x[t:t + 1], state, t) for t in range(40)])
        torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-9, msg=symbol)


def test_based_state_is_constant_in_sequence_length(single_process):
    mixer, cfg = make_mixer("B")
    state = mixer.init_state(batch=2, max_len=10_000)
    assert state["kv"].shape == (2, cfg.num_heads, 1 + 16 + 256, cfg.effective("based_head_dim") + 1)


def test_mixers_are_causal(single_process):
    for symbol in "BV":
        mixer, _ = make_mixer(symbol)
        assert_causal(mixer, randn(40, 2, 64, seed=4))


def test_based_mixer_is_the_equations_on_its_projections(single_process):
    mixer, cfg = make_mixer("B")
    x = randn(20, 2, 64, seed=5)
    h, f = cfg.num_heads, cfg.based_feature_dim
    q = (x @ mixer.q_proj.weight.t()).unflatten(-1, (h, f))
    k = (x @ mixer.k_proj.weight.t()).unflatten(-1, (h, f))
    v = (x @ mixer.v_proj.weight.t()).unflatten(-1, (h, -1))
    o = recurrence_token_by_token(q, k, v, eps=cfg.based_eps).flatten(-2)
    torch.testing.assert_close(mixer(x), o @ mixer.o_proj.weight.t(), rtol=1e-9, atol=1e-9)


def test_baseconv_is_the_gated_short_convolution(single_process):
    mixer, cfg = make_mixer("V")
    x = randn(12, 2, 64, seed=6)
    u = x @ mixer.in_conv.weight.t() + mixer.in_conv.bias
    g = x @ mixer.in_gate.weight.t() + mixer.in_gate.bias
    kernel = cfg.conv_kernel
    padded = F.pad(u, (0, 0, 0, 0, kernel - 1, 0))
    conv = torch.stack([(padded[t:t + kernel].permute(1, 2, 0) * mixer.conv.weight).sum(-1) for t in range(12)])
    expected = (F.silu(conv) * g) @ mixer.out_proj.weight.t() + mixer.out_proj.bias
    torch.testing.assert_close(mixer(x), expected, rtol=1e-10, atol=1e-10)
    assert mixer.conv.bias is None and mixer.in_conv.weight.shape == (2 * 64, 64)  # Based: no conv bias, width 2d


def test_model_decoding_equals_forward(single_process):
    model = build_model("based-tiny", seed=2).double().eval()
    ids = torch.randint(0, 320, (2, 35), generator=torch.Generator().manual_seed(0))
    full = model(ids)
    state = model.init_state(2, 35)
    steps = torch.stack([model.step(ids[:, t], state, t) for t in range(35)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-9)


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match=r"num_heads=3 must divide d_model=64 for Based \(or set based_head_dim\)"):
        ModelConfig(pattern="B", vocab_size=64, d_model=64, num_heads=3)
    with pytest.raises(ValueError, match="based_feature_dim"):
        ModelConfig(pattern="B", vocab_size=64, d_model=64, based_feature_dim=0)
    cfg = ModelConfig(pattern="BV", vocab_size=64, d_model=64, num_heads=4, baseconv_width=96)
    assert "model.num_heads=4" in cfg.check_tensor_parallel(8)
    assert cfg.check_tensor_parallel(4) is None
    assert "model.baseconv_width=96" in ModelConfig(pattern="V", vocab_size=64, d_model=64,
                                                     baseconv_width=96).check_tensor_parallel(64)


# ---- fla's reference ops (fla-core, a test extra): fla/ops/based/naive.py is plain torch, loaded by file path
# (importing the fla package needs triton) ----------------------------------------------------------------------


def fla_naive():
    path = importlib.metadata.distribution("fla-core").locate_file("fla/ops/based/naive.py")
    spec = importlib.util.spec_from_file_location("fla_based_naive", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_equals_fla_reference_on_the_same_weights(single_process):
    naive = fla_naive()
    mixer, cfg = make_mixer("B", dtype=torch.float32, based_chunk=8)
    x = randn(32, 2, 64, seed=7, dtype=torch.float32)  # fla's chunked reference needs a multiple of its chunk
    q, k, v = (t.permute(1, 2, 0, 3) for t in mixer.project(x))  # fla's layout [b, h, s, d]
    for o in (naive.naive_parallel_based(q, k, v, use_norm=True), naive.naive_chunk_based(q, k, v, chunk_size=8)):
        expected = mixer.o_proj(o.permute(2, 0, 1, 3).flatten(-2))
        torch.testing.assert_close(mixer(x), expected, rtol=1e-5, atol=1e-5)
    # and each of our forms against fla's quadratic form, per head
    q, k, v = mixer.project(x)
    fla = naive.naive_parallel_based(*(t.permute(1, 2, 0, 3) for t in (q, k, v))).permute(2, 0, 1, 3)
    for ours in (based_parallel(q, k, v), based_recurrent(q, k, v), based_chunked(q, k, v, 5)):
        torch.testing.assert_close(ours, fla, rtol=1e-5, atol=1e-5)


# ---- published sizes: the released configs (HazyResearch/based, train/configs/experiment/reference/) -----------

RELEASED = {  # the fields of based-360m.yaml and based-1b.yaml that size the model
    "based-360m": dict(n_embd=1024, n_layer=27, alt_mixer_layers=[1, 6, 11, 16, 21],
                       alt_mixer_2_layers=[2, 7, 12, 17, 22], num_heads=16, feature_dim=16),
    "based-1.3b": dict(n_embd=1792, n_layer=36, alt_mixer_layers=[1, 6, 11, 16, 21, 27, 33],
                       alt_mixer_2_layers=[2, 7, 12, 17, 22, 28, 34], num_heads=16, feature_dim=16),
}


def reference_parameter_count(n_embd, n_layer, alt_mixer_layers, alt_mixer_2_layers, num_heads, feature_dim,
                              vocab_size=50257, pad_vocab_size_multiple=8, expand_proj=4, kernel_size=3):
    """The parameters of Based's GPTLMHeadModel as its modules declare them (based/models/gpt.py, block.py, mlp.py,
    mixers/convolution.py, linear_attention.py, slide_attention.py), with the configs' settings: RMSNorm (weight
    only), SwiGLU GatedMlp with n_inner = 2 n_embd (rounded up to 256) and no biases, no position embeddings,
    tied LM head."""
    d = n_embd
    vocab = math.ceil(vocab_size / pad_vocab_size_multiple) * pad_vocab_size_multiple

    def linear(i, o, bias=False):
        return i * o + (o if bias else 0)

    hidden = (2 * d + 255) // 256 * 256
    mlp = linear(d, 2 * hidden) + linear(hidden, d)  # fc1 (gate and value), fc2
    d_inner = expand_proj * d // 2
    base_conv = linear(d, expand_proj * d, True) + d_inner * kernel_size + linear(d_inner, d, True)  # conv: no bias
    head_dim = d // num_heads
    linear_attention = 2 * linear(d, feature_dim * num_heads) + linear(d, num_heads * head_dim) + linear(d, d)
    sliding_attention = linear(d, 3 * d) + linear(d, d)  # Wqkv, out_proj; qkv_proj_bias = out_proj_bias = False
    total = vocab * d + d  # word embeddings (tied with lm_head), ln_f
    for i in range(n_layer):
        mixer = (linear_attention if i in alt_mixer_layers else sliding_attention if i in alt_mixer_2_layers
                 else base_conv)
        total += mixer + mlp + 2 * d  # norm1, norm2
    return total


@pytest.mark.parametrize("preset", sorted(RELEASED))
def test_published_sizes_equal_the_released_configs(single_process, preset):
    from chimera.models.causal_lm import CausalLM

    with torch.device("meta"):
        ours = CausalLM(load_model_config(preset)).num_parameters()
    assert ours == reference_parameter_count(**RELEASED[preset])
    assert ours == {"based-360m": 362_620_928, "based-1.3b": 1_349_453_056}[preset]  # the figures in the presets


def test_flops_per_token_counts_the_chunked_forms_products(single_process):
    """The pipeline balancer's figure equals torch's count of the forward's matrix products (s a multiple of the
    chunk)."""
    from torch.utils.flop_counter import FlopCounterMode

    from chimera.models.mixers.based import flops_per_token

    mixer, cfg = make_mixer("B", dtype=torch.float32)
    x = randn(64, 2, 64, seed=8, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        mixer(x)
    assert counter.get_total_flops() == sum(flops_per_token(cfg.sublayer("B"), 64).values()) * 64 * 2
