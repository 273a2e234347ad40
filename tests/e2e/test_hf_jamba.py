"""Jamba (arXiv 2403.19887) number for number with transformers' ``JambaForCausalLM``, on a tiny random model
built here (no downloads) with attention, Mamba, MLP and MoE layers: import -> equal logits and greedy
generation; export -> transformers loads it natively, equal again. And jamba-tiny at TP=2 equals TP=1."""

import json

import pytest
import torch
import transformers

from chimera.configs.loader import load_model_config
from chimera.errors import UserError
from chimera.models.hf import jamba
from helpers import assert_same_numbers, hf_round_trip, run_tp_layout

VOCAB = 320


def tiny_jamba(**overrides) -> transformers.JambaForCausalLM:
    # 8 layers: attention at 2 and 6, MoE at the odd ones: every kind of sublayer appears, with both mixers
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=8, num_attention_heads=4,
              num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=4, attn_layer_offset=2,
              expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
              mamba_dt_rank=8, rms_norm_eps=1e-6, tie_word_embeddings=False, use_mamba_kernels=False,
              eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.JambaForCausalLM(transformers.JambaConfig(**kw | overrides))
    with torch.no_grad():  # off the unit / structured init, so that every norm weight and bias matters
        g = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", "mamba.D", "A_log", "dt_proj.bias", "conv1d.bias")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            if name.endswith("router.weight"):
                p.normal_(0.0, 0.5, generator=g)  # a decisive router: top-k choices not at the edge of a tie
    return model.eval()


def test_import_export_round_trip(tmp_path, single_process):
    hf_model = tiny_jamba()
    assert hf_model.config.layers_block_type.count("attention") == 2
    assert hf_model.config.layers_num_experts.count(4) == 4
    r = hf_round_trip(tmp_path, hf_model, VOCAB)
    assert "model.layers.1.feed_forward.experts.3.down_proj.weight" in r.on_disk  # per expert on disk
    assert r.ours.cfg.layers == "m-mE*-mEm-mE*-mE" and r.ours.head is not None
    assert r.ref.abs().max() > 0.5
    assert r.back.config.layers_block_type == hf_model.config.layers_block_type
    assert r.back.config.layers_num_experts == hf_model.config.layers_num_experts


def test_config_round_trip_and_unsupported_variants():
    for preset in ("jamba-tiny", "jamba-v0.1"):
        cfg = load_model_config(preset)
        hf = jamba.config_to_hf(cfg)
        hf_cfg = transformers.JambaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
        assert "".join(("*" if b == "attention" else "m") + ("E" if e > 1 else "-") for b, e in
                       zip(hf_cfg.layers_block_type, hf_cfg.layers_num_experts)) == cfg.layers
        back = jamba.config_from_hf(json.loads(json.dumps(hf)))
        assert {k: getattr(cfg, k) for k in back if k != "name"} == {k: v for k, v in back.items() if k != "name"}
    dense = jamba.config_from_hf({"vocab_size": VOCAB, "hidden_size": 64, "num_attention_heads": 4,
                                  "num_hidden_layers": 3, "num_experts": 1, "attn_layer_period": 2,
                                  "attn_layer_offset": 1})
    assert dense["pattern"] == "m-*-m-"
    base = {"vocab_size": VOCAB, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 8}
    for bad, text in (({"mamba_proj_bias": True}, "mamba_proj_bias"), ({"mamba_conv_bias": False}, "mamba_conv_bias"),
                      ({"hidden_act": "gelu"}, "hidden_act"), ({"attn_layer_offset": 8}, "attn_layer_offset")):
        with pytest.raises(UserError, match=text):
            jamba.config_from_hf(base | bad)
    for override, text in ((["rope_fraction=0.5"], "rope_fraction"), (["ssm_dt_bc_norm=false"], "ssm_dt_bc_norm"),
                           (["pattern=m-*-E"], "alternates"), (["moe_normalize_top_k=true"], "renormalise")):
        with pytest.raises(UserError, match=text):
            jamba.config_to_hf(load_model_config("jamba-tiny", override))


def test_tp2_equals_tp1(tmp_path):
    """Logits, loss and every gradient, including the replicated dt/B/C norm weights (partial over TP)."""
    ref = run_tp_layout(tmp_path, "jamba-tiny", 1, False)
    got = run_tp_layout(tmp_path, "jamba-tiny", 2, True)
    assert any(name.endswith("mixer.dt_layernorm.weight") for name in ref["grads"])
    assert_same_numbers(got, ref)
