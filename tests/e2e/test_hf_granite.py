"""IBM Granite-4.0-H number for number with transformers' ``GraniteMoeHybridForCausalLM``, on tiny random models
built here (no downloads) with Mamba-2 and attention mixers, MoE + shared-expert feed-forwards and all four muP
multipliers: import -> equal logits and greedy generation; export -> transformers loads it natively, equal again.
Variants (RoPE with attention biases and an untied head; dense Granite) import to equal logits. And
granite-tiny at TP=2 equals TP=1."""

import json

import pytest
import torch
import transformers

import chimera
from chimera.configs.loader import load_model_config
from chimera.errors import UserError
from chimera.models.hf import granitemoehybrid
from helpers import assert_same_numbers, hf_round_trip, run_chimera_here, run_tp_layout

VOCAB = 320


def tiny_granite(**overrides) -> transformers.GraniteMoeHybridForCausalLM:
    # 6 layers, attention at 1 and 4; Mamba-2 with 8 heads in 2 groups; 4 experts of width 48, shared MLP of 80
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, shared_intermediate_size=80,
              num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
              num_experts_per_tok=2, layer_types=["mamba", "attention", "mamba", "mamba", "attention", "mamba"],
              mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
              mamba_chunk_size=8, position_embedding_type="nope", tie_word_embeddings=True,
              embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625, logits_scaling=2.0,
              rms_norm_eps=1e-5, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.GraniteMoeHybridForCausalLM(transformers.GraniteMoeHybridConfig(**kw | overrides))
    with torch.no_grad():  # off the unit / structured init, so that every norm weight and bias matters
        g = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", "norm.weight", "mamba.D", "A_log", "dt_bias", "conv1d.bias",
                              "_proj.bias")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            if name.endswith("router.weight"):
                p.normal_(0.0, 0.5, generator=g)  # a decisive router: top-k choices not at the edge of a tie
    return model.eval()


IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def test_import_export_round_trip(tmp_path, single_process):
    hf_model = tiny_granite()
    r = hf_round_trip(tmp_path, hf_model, VOCAB)
    # Granite's own names on disk (transformers fuses and renames the experts only in memory)
    assert r.on_disk["model.layers.0.block_sparse_moe.input_linear.weight"].shape == (4, 96, 64)
    assert "model.layers.0.block_sparse_moe.router.layer.weight" in r.on_disk and "lm_head.weight" not in r.on_disk
    assert r.ours.cfg.layers == "ME*EMEME*EME" and r.ours.head is None
    assert r.ref.abs().max() > 0.5
    assert r.back.config.layer_types == hf_model.config.layer_types
    for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
        assert getattr(r.back.config, key) == getattr(hf_model.config, key), key


@pytest.mark.parametrize("variant", [
    dict(position_embedding_type="rope", attention_bias=True, tie_word_embeddings=False),
    dict(num_local_experts=0, num_experts_per_tok=0),  # dense Granite: the shared MLP alone, our '-'
], ids=["rope-bias-untied", "dense"])
def test_variants_import_and_export(tmp_path, single_process, variant):
    hf_model = tiny_granite(**variant)
    hf_model.save_pretrained(tmp_path / "hf")
    proc = run_chimera_here("import-hf", tmp_path / "hf", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = chimera.load_model(tmp_path / "run")
    assert ours.cfg.layers == ("M-*-M-M-*-M-" if variant.get("num_local_experts") == 0 else "ME*EMEME*EME")
    with torch.no_grad():
        ref = hf_model(IDS).logits
        assert (ours(IDS) - ref).abs().max() <= 1e-4
    proc = run_chimera_here("export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "exported")
    assert proc.returncode == 0, proc.stderr[-3000:]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        assert (back(IDS).logits - ref).abs().max() <= 1e-4


def test_config_round_trip_and_unsupported_variants():
    for preset in ("granite-tiny", "granite-4.0-h-tiny"):
        cfg = load_model_config(preset)
        hf = granitemoehybrid.config_to_hf(cfg)
        hf_cfg = transformers.GraniteMoeHybridConfig(
            **{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
        assert "".join(("*" if t == "full_attention" else "M") + "E" for t in hf_cfg.layer_types) == cfg.layers
        back = granitemoehybrid.config_from_hf(json.loads(json.dumps(hf)))
        assert {k: getattr(cfg, k) for k in back if k != "name"} == {k: v for k, v in back.items() if k != "name"}
    base = {"vocab_size": VOCAB, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "layer_types": ["mamba", "attention"], "mamba_n_heads": 8}
    assert granitemoehybrid.config_from_hf(base | {"num_local_experts": 0})["pattern"] == "M-*-"
    for bad, text in (({"mamba_proj_bias": True}, "mamba_proj_bias"), ({"mamba_conv_bias": False}, "mamba_conv_bias"),
                      ({"hidden_act": "gelu"}, "hidden_act"), ({"time_step_limit": [0.0, 10.0]}, "time_step_limit"),
                      ({"layer_types": ["mamba", "moe"]}, "layer_types"), ({"mamba_n_heads": 5}, "mamba_n_heads"),
                      ({"position_embedding_type": "rope", "rope_parameters": {"rope_type": "yarn", "factor": 2.0}},
                       "RoPE type 'yarn' is not supported")):
        with pytest.raises(UserError, match=text):
            granitemoehybrid.config_from_hf(base | bad)
    for override, text in ((["rope_fraction=0.5"], "rope_fraction"), (["moe_shared_hidden=null"], "shared MLP"),
                           (["pattern=ME*-", "mlp_hidden=64"], "alternates"),
                           (["moe_normalize_top_k=false"], "renormalises"), (["mlp_activation=gelu_tanh"], "silu")):
        with pytest.raises(UserError, match=text):
            granitemoehybrid.config_to_hf(load_model_config("granite-tiny", override))


def test_tp2_equals_tp1(tmp_path):
    """Logits, loss and every gradient, the shared experts' included, under sequence parallelism."""
    ref = run_tp_layout(tmp_path, "granite-tiny", 1, False)
    got = run_tp_layout(tmp_path, "granite-tiny", 2, True)
    assert any(name.endswith("mixer.shared_expert.down.weight") for name in ref["grads"])
    assert_same_numbers(got, ref)
