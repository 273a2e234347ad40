"""The FLOP model (chimera.models.flops) against hand counts: for one layer of each kind, written here from the
layer's dimensions (a multiply-add is 2 FLOPs; matrix products and the sequence mixing counted, pointwise work not;
see the module's docstring), and for a dense transformer without its attention scores, 6 x params per token."""

from __future__ import annotations

import math

import pytest
import torch

from chimera.configs.loader import load_model_config
from chimera.configs.schema import ModelConfig
from chimera.errors import UserError
from chimera.models import registry
from chimera.models.causal_lm import meta_model
from chimera.models.flops import breakdown, forward_flops_per_token, kind_totals, model_flops_per_token, sublayer_flops

D, V = 64, 256


def config(pattern: str, **fields) -> ModelConfig:
    return ModelConfig(pattern=pattern, vocab_size=V, d_model=D, **fields)


def forward(cfg: ModelConfig, symbol: str, s: int) -> float:
    return sum(sublayer_flops(cfg, symbol, s).values())


def mean_keys(s: int, window: int | None = None) -> float:
    """The keys each causal query sees, averaged over positions 1..s (at most ``window``)."""
    return sum(t if window is None else min(t, window) for t in range(1, s + 1)) / s


def test_every_sublayer_kind_declares_its_count():
    missing = [s for s, spec in registry.sublayers().items() if spec.flops_per_token is None]
    assert not missing


@pytest.mark.parametrize("s", [1, 100, 128])
def test_global_attention(s):
    cfg = config("*", num_heads=4, num_kv_heads=2)  # head_dim 16: q, o 64 wide, k, v 32 wide
    projections = 2 * (D * 64 + D * 32 + D * 32 + 64 * D)
    scores = 2 * 2 * 4 * 16 * mean_keys(s)  # q.k and p.v per query head over the keys seen
    assert forward(cfg, "*", s) == pytest.approx(projections + scores)
    assert mean_keys(128) == 64.5


def test_local_attention_counts_only_its_window():
    cfg = config("L", num_heads=4, num_kv_heads=4, window=32)
    projections = 2 * 4 * D * D
    for s in (20, 32, 100, 4096):
        assert forward(cfg, "L", s) == pytest.approx(projections + 2 * 2 * D * mean_keys(s, 32))
    assert forward(cfg, "L", 4096) < projections + 2 * 2 * D * 32  # at most the window


def test_bigbird_sees_its_blocks():
    cfg = config("K", num_heads=4, num_kv_heads=4, bigbird_block=16, bigbird_sliding_blocks=3,
                 bigbird_global_blocks=1, bigbird_random_blocks=1)
    keys = (3 + 1 + 1) * 16 - 8  # five blocks, half a block fewer in its own
    assert forward(cfg, "K", 4096) == pytest.approx(2 * 4 * D * D + 4 * D * keys)
    assert forward(cfg, "K", 16) == pytest.approx(2 * 4 * D * D + 4 * D * 8.5)  # short: causal over the sequence


def test_rglru_block():
    cfg = config("R", num_heads=4, rnn_width=96, conv_kernel=4)
    projections = 2 * (D * 96 + D * 96 + 96 * D)  # W_y, W_x, W_out
    gates = 2 * 2 * 4 * 24 * 24  # W_a, W_x: 4 blocks of 24 x 24
    conv, scan = 2 * 4 * 96, 2 * 96
    assert forward(cfg, "R", 512) == pytest.approx(projections + gates + conv + scan)


@pytest.mark.parametrize("heads", [1, 4])
def test_mamba1_selective_scan(heads):
    cfg = config("m", ssm_state=8, ssm_expand=2, ssm_dt_rank=4, conv_kernel=4, ssm_heads=heads)
    inner = 128
    projections = 2 * (2 * D * inner + inner * (4 + 2 * 8) + 4 * inner + inner * D)  # in, x_proj, dt_proj, out
    scan = 2 * inner * 8 + 2 * inner * 8  # h = a h + b and y = C . h per state element
    assert forward(cfg, "m", 256) == pytest.approx(projections + 2 * 4 * inner + scan)


def test_mamba1_projections_are_its_matrices():
    cfg = config("m", ssm_state=8, ssm_expand=2, ssm_dt_rank=4)
    with torch.device("meta"):
        model = meta_model(cfg)
    matrices = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.0.mixer.")
                   and n.rsplit(".", 2)[-2] in ("in_proj_x", "in_proj_z", "x_proj", "dt_proj", "out_proj")
                   and n.endswith("weight"))
    assert sublayer_flops(cfg, "m", 64)["projections"] == 2 * matrices


@pytest.mark.parametrize("s", [16, 128])
def test_mamba2_ssd_chunked(s):
    cfg = config("M", ssm_state=8, ssm_expand=2, ssm_head_dim=16, ssm_groups=2, ssm_chunk=32, conv_kernel=4)
    inner, heads, n, p = 128, 8, 8, 16
    q = min(32, s)
    projections = 2 * (D * (inner + inner + 2 * 2 * n + heads) + inner * D)  # z, x, B and C of 2 groups, dt; out
    conv = 2 * 4 * (inner + 2 * 2 * n)
    within = 2 * 2 * q * n + heads * 2 * q * p  # C B^T per group, then its product with the inputs per head
    states = heads * (2 * n * p + 2 * n * p / q + 2 * n * p)  # chunk states, passing, entering read-out
    assert forward(cfg, "M", s) == pytest.approx(projections + conv + within + states)


def test_s5():
    cfg = config("S", s5_state=32)  # 16 stored complex states (conjugate pairs)
    assert forward(cfg, "S", 1000) == pytest.approx(2 * 2 * 16 * D + 2 * 2 * 16 * D + 8 * 16)


def test_based_linear_attention():
    cfg = config("B", num_heads=4, based_feature_dim=8, based_head_dim=16, based_chunk=32)
    expanded = 1 + 8 + 8 * 8  # Taylor features: 1, x, x x^T
    projections = 2 * D * 4 * (8 + 8 + 16 + 16)  # q, k (f each), v (p) per head, out from p per head
    chunk = 4 * (2 * 32 * 8 + 2 * 32 * (16 + 1))  # scores over the chunk, weighted [v, 1]
    state = 4 * 2 * 2 * expanded * (16 + 1)  # update and read-out of [D, p + 1]
    assert forward(cfg, "B", 512) == pytest.approx(projections + chunk + state)


def test_rwkv6_time_mix():
    cfg = config("W", rwkv_head_size=16, rwkv_mix_lora=8, rwkv_decay_lora=16, rwkv_chunk=16)
    heads, n, q = 4, 16, 16
    projections = 2 * 5 * D * D  # r, k, v, g, out
    loras = 2 * (D * 5 * 8 + 5 * 8 * D) + 2 * (D * 16 + 16 * D)  # token-shift mix, decay
    wkv = heads * (2 * q * n + 2 * q * n + 2 * n * n + 2 * n * n / q + 2 * n * n)
    assert forward(cfg, "W", 256) == pytest.approx(projections + loras + wkv)


def test_hyena_fft_conv_grows_as_l_log_l():
    cfg = config("H", num_heads=4, hyena_order=2, hyena_short_kernel=3)
    projections = 2 * (D * 3 * D + D * D)
    short = 2 * 3 * D * 3
    for s in (1024, 4096):
        fft = D * (3 * 2.5 * 2 * math.log2(2 * s) + 4)  # three 2s-point transforms per token and channel, products
        assert forward(cfg, "H", s) == pytest.approx(projections + short + fft + 2 * D)


def test_hyena_explicit_filters():
    cfg = config("XD", num_heads=4, hyena_order=2, hyena_short_kernel=3, hyena_short_filter_len=7,
                 hyena_medium_filter_len=128)
    base = 2 * (D * 3 * D + D * D) + 2 * 3 * D * 3 + 4 * D + 2 * D
    assert forward(cfg, "X", 999) == pytest.approx(base + 2 * D * 7)
    assert forward(cfg, "D", 999) == pytest.approx(base + 2 * D * 128)


def test_gold_counts_its_cache_once():
    cfg = config("GG", rwkv_head_size=16, rwkv_mix_lora=8, gold_value_lora=16, gold_compression=16)
    layer = 2 * (2 * D * D + 2 * D * 8 + 2 * 2 * D * 8 + 2 * 2 * D * 16)  # q, o, the q / kv / k / v LoRAs
    scores = 4 * D * mean_keys(200)
    cache = 2 * (D * 4 + (D + 4) * D)  # compress to d / 16, decompress [e; c]
    first, second, head = breakdown(cfg, 200)
    assert first.total == pytest.approx(layer + scores + cache)
    assert second.total == pytest.approx(layer + scores)
    assert head.total == 2 * D * V


def test_channel_mixers():
    mlp = config("-", mlp_hidden=96)
    assert forward(mlp, "-", 10) == 2 * 3 * D * 96
    moe = config("E", mlp_hidden=96, moe_experts=8, moe_top_k=2, moe_shared_hidden=32)
    assert forward(moe, "E", 10) == 2 * (D * 8 + 2 * 3 * D * 96 + 3 * D * 32)  # router, 2 of 8 experts, shared
    channel_mix = config("C", rwkv_ffn_hidden=224)
    assert forward(channel_mix, "C", 10) == 2 * (D * 224 + 224 * D + D * D)
    baseconv = config("V", baseconv_width=128, conv_kernel=3)
    assert forward(baseconv, "V", 10) == 2 * (2 * D * 128 + 128 * D) + 2 * 3 * 128


def test_routed_hybrid_runs_each_path_on_its_capacity():
    cfg = config("Y", num_heads=4, num_kv_heads=4, ssm_state=8, ssm_expand=2, ssm_head_dim=16, ssm_chunk=16,
                 routed_capacity_ssm=1.0, routed_capacity_attention=0.5, routed_state_ratios=[1])
    ssm = config("M", ssm_state=8, ssm_expand=2, ssm_head_dim=16, ssm_chunk=16)
    attention = 2 * 4 * D * D + 4 * D * mean_keys(64)  # half of 128 tokens routed to it
    assert forward(cfg, "Y", 128) == pytest.approx(forward(ssm, "M", 128) + 0.5 * attention + 2 * D * 2)


def test_zamba_shared_use():
    cfg = load_model_config("zamba2-tiny")  # d 64, 4 heads of 32 (4 kv), MLP 128, LoRA rank 8 on MLP and q, k, v
    uses = [row for row in breakdown(cfg, 64) if row.symbol in "01"]
    assert len(uses) == 3
    attention = 2 * (2 * D * 128 * 3 + 128 * D) + 2 * 2 * 128 * mean_keys(64)  # q, k, v from concat(h, e); o
    mlp, use_linear = 2 * 3 * D * 128, 2 * D * D
    lora = 2 * (8 * D + 2 * 128 * 8) + 2 * (3 * 8 * 2 * D + 3 * 128 * 8)
    assert uses[0].total == pytest.approx(attention + mlp + use_linear + lora)


def test_model_total_is_three_forward_passes_with_the_head():
    cfg = config("R-", num_layers=6, num_heads=4, mlp_hidden=128)
    per_layer = forward(cfg, "R", 300) + forward(cfg, "-", 300)
    assert forward_flops_per_token(cfg, 300) == pytest.approx(3 * per_layer + 2 * D * V)
    assert model_flops_per_token(cfg, 300) == pytest.approx(3 * (3 * per_layer + 2 * D * V))
    totals = kind_totals(cfg, 300)
    assert totals["head"] == 3 * 2 * D * V and sum(totals.values()) == pytest.approx(model_flops_per_token(cfg, 300))


@pytest.mark.parametrize("tied", [True, False])
def test_dense_transformer_without_scores_is_six_params_per_token(tied):
    """Kaplan et al.'s C = 6 N per token: N the layers' matrices (norm gains left out) and the output head."""
    cfg = config("*-", num_layers=8, num_heads=4, num_kv_heads=2, mlp_hidden=160, tie_embeddings=tied)
    model = meta_model(cfg)
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.dim() >= 2 and name != "embed.weight")
    n = matrices + (D * V if tied else 0)  # tied: the embedding matrix is also the head's
    for s in (64, 2048):
        without_scores = sum(value for row in breakdown(cfg, s) for term, value in row.terms.items()
                             if term != "scores")
        assert 3 * without_scores == pytest.approx(6 * n)


def test_byte_latent_and_bad_lengths_are_refused():
    with pytest.raises(UserError, match="byte-latent"):
        model_flops_per_token(load_model_config("hyena-glt-tiny"), 256)
    with pytest.raises(UserError, match="at least 1"):
        model_flops_per_token(config("*"), 0)
