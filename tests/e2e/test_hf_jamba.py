"""Jamba (arXiv 2403.19887) number for number with transformers' ``JambaForCausalLM``, on a tiny random model
built here (no downloads) with attention, Mamba, MLP and MoE layers: import -> equal logits and greedy
generation; export -> transformers loads it natively, equal again. And jamba-tiny at TP=2 equals TP=1."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import chimera
from chimera.configs.loader import load_model_config
from chimera.errors import UserError
from chimera.models.hf import jamba
from chimera.trainer.generate import generate
from helpers import assert_same_numbers, run_chimera, run_tp_layout

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


def hf_greedy(model, prompt, n):
    model.generation_config.eos_token_id = None  # 20 tokens, whatever they are
    out = model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, : prompt.shape[1] + n]


def test_import_export_round_trip(tmp_path, single_process):
    hf_model = tiny_jamba()
    assert hf_model.config.layers_block_type.count("attention") == 2
    assert hf_model.config.layers_num_experts.count(4) == 4
    hf_model.save_pretrained(tmp_path / "hf")
    on_disk = load_file(str(tmp_path / "hf/model.safetensors"))
    assert "model.layers.1.feed_forward.experts.3.down_proj.weight" in on_disk  # per expert on disk
    proc = run_chimera("import-hf", tmp_path / "hf", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]

    ours = chimera.load_model(tmp_path / "run")
    assert ours.cfg.layers == "m-mE*-mEm-mE*-mE" and ours.head is not None
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(ids).logits
        got = ours(ids)
    assert ref.abs().max() > 0.5
    assert (got - ref).abs().max() <= 1e-4

    prompt = ids[:1, :5]
    expected = hf_greedy(hf_model, prompt, 20)
    assert expected.shape == (1, 25)
    assert torch.equal(generate(ours, prompt, 20, temperature=0), expected)

    proc = run_chimera("export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "exported")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(load_file(str(tmp_path / "exported/model.safetensors"))) == set(on_disk)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert type(back) is type(hf_model)
    assert back.config.layers_block_type == hf_model.config.layers_block_type
    assert back.config.layers_num_experts == hf_model.config.layers_num_experts
    with torch.no_grad():
        assert (back(ids).logits - got).abs().max() <= 1e-4
    assert torch.equal(hf_greedy(back, prompt, 20), expected)


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
