"""Zamba (arXiv 2405.16712) and Zamba2 (arXiv 2411.15242) number for number with transformers'
``ZambaForCausalLM`` / ``Zamba2ForCausalLM``, on tiny random models built here (no downloads): import -> equal
logits and greedy generation; export -> transformers loads it natively, equal again. The shared blocks' tied
copies (written by transformers when the head is untied) are checked and written. And TP=2 equals TP=1."""

import json

import pytest
import torch
import transformers

from chimera.configs.loader import load_model_config
from chimera.errors import UserError
from chimera.models.hf import zamba, zamba2
from helpers import assert_same_numbers, hf_round_trip, run_chimera_here, run_tp_layout

VOCAB = 320
MAMBA, HYBRID = "mamba", "hybrid"


def perturbed(model):
    """Off the unit / structured init, so that every norm weight, bias and adapter matters."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", ".D", "A_log", "dt_proj_bias", "dt_bias", "conv1d.bias",
                              "mamba.norm.weight")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            if "adapter" in name:
                p.normal_(0.0, 0.1, generator=g)
    return model.eval()


def tiny_zamba(**overrides) -> transformers.ZambaForCausalLM:
    # 7 layers, hybrids at 2 and 4 (the shared block used twice), two Mamba heads
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=7, num_attention_heads=4,
              num_key_value_heads=4, n_mamba_heads=2, attn_layer_period=3, attn_layer_offset=1, mamba_d_state=8,
              mamba_dt_rank=4, tie_word_embeddings=True, eos_token_id=None)
    torch.manual_seed(0)
    return perturbed(transformers.ZambaForCausalLM(transformers.ZambaConfig(**kw | overrides)))


def tiny_zamba2(**overrides) -> transformers.Zamba2ForCausalLM:
    # 8 layers, hybrids at 1, 3, 5: blocks 0, 1, 0; adapters on the MLP and on q, k, v; RoPE
    types = [MAMBA, HYBRID, MAMBA, HYBRID, MAMBA, HYBRID, MAMBA, MAMBA]
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=8, layers_block_type=types,
              num_attention_heads=4, n_mamba_heads=4, mamba_d_state=8, mamba_ngroups=2, num_mem_blocks=2,
              use_shared_attention_adapter=True, adapter_rank=4, use_mem_rope=True, chunk_size=4,
              tie_word_embeddings=True, eos_token_id=None)
    torch.manual_seed(0)
    return perturbed(transformers.Zamba2ForCausalLM(transformers.Zamba2Config(**kw | overrides)))


def round_trip(tmp_path, hf_model, layers: str):
    r = hf_round_trip(tmp_path, hf_model, VOCAB)
    assert r.ours.cfg.layers == layers
    assert r.ref.abs().max() > 0.3
    assert r.back.config.layers_block_type == hf_model.config.layers_block_type
    return r.ours


def test_zamba_import_export_round_trip(tmp_path, single_process):
    hf_model = tiny_zamba()
    assert hf_model.config.layers_block_type.count(HYBRID) == 2
    ours = round_trip(tmp_path, hf_model, "mm0mm0mmm")
    assert len(ours.shared) == 1 and ours.layers[2].block is ours.layers[4].block is ours.shared[0]


def test_zamba2_import_export_round_trip(tmp_path, single_process):
    hf_model = tiny_zamba2()
    on_disk_names = set(hf_model.state_dict())
    assert any("linear_q_adapter_list" in n for n in on_disk_names)
    ours = round_trip(tmp_path, hf_model, "M0MM1MM0MMM")
    assert ours.layers[1].block is ours.layers[5].block is not ours.layers[3].block
    # each use its own adapters: uses 0 and 2 of block 0 differ
    assert not torch.equal(ours.layers[1].adapters["mlp"].a, ours.layers[5].adapters["mlp"].a)


def test_untied_head_writes_and_checks_the_shared_block_copies(tmp_path, single_process):
    """transformers 5 ties the shared blocks only with a tied head; with an untied one it keeps (and saves) one
    copy per hybrid layer. Copies equal to the first use import and export; copies that differ are refused."""
    hf_model = tiny_zamba2(tie_word_embeddings=False)
    layers = hf_model.model.layers
    with torch.no_grad():  # make the copies true copies of the block's first use (adapters stay per use)
        for later, first in ((5, 1),):
            for name, p in layers[later].shared_transformer.named_parameters():
                if "adapter_list" not in name:
                    p.copy_(layers[first].shared_transformer.get_parameter(name))
    ours = round_trip(tmp_path, hf_model, "M0MM1MM0MMM")
    assert ours.head is not None

    with torch.no_grad():
        layers[5].shared_transformer.pre_ff_layernorm.weight.add_(0.5)
    hf_model.save_pretrained(tmp_path / "hf-differs")
    proc = run_chimera_here("import-hf", tmp_path / "hf-differs", "--out", tmp_path / "refused")
    assert proc.returncode == 2 and "are not shared" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("preset,module,cls", [("zamba-tiny", zamba, transformers.ZambaConfig),
                                               ("zamba-7b", zamba, transformers.ZambaConfig),
                                               ("zamba2-tiny", zamba2, transformers.Zamba2Config),
                                               ("zamba2-2.7b", zamba2, transformers.Zamba2Config)])
def test_config_round_trip(preset, module, cls):
    cfg = load_model_config(preset)
    hf = module.config_to_hf(cfg)
    hf_cfg = cls(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    assert [t == HYBRID for t in hf_cfg.layers_block_type] == [u is not None for u in zamba.uses_of(cfg)]
    back = module.config_from_hf(json.loads(json.dumps(hf)))
    assert {k: getattr(cfg, k) for k in back if k != "name"} == {k: v for k, v in back.items() if k != "name"}


def test_unsupported_variants_and_models():
    base = {"model_type": "zamba", "vocab_size": VOCAB, "hidden_size": 32, "num_attention_heads": 4,
            "num_hidden_layers": 7}
    for bad, text in (({"mamba_proj_bias": True}, "mamba_proj_bias"), ({"hidden_mamba_act": "gelu"}, "hidden_mamba"),
                      ({"hidden_act": "silu"}, "hidden_act"), ({"attention_hidden_size": 40}, "attention_hidden_size"),
                      ({"layers_block_type": ["mamba"] * 3}, "layers_block_type")):
        with pytest.raises(UserError, match=text):
            zamba.config_from_hf(base | bad)
    with pytest.raises(UserError, match="num_mem_blocks"):
        zamba2.config_from_hf(base | {"model_type": "zamba2", "num_mem_blocks": 3})
    for preset, module, override, text in (
            ("zamba-tiny", zamba, ["rope_fraction=1.0"], "rope_fraction"),
            ("zamba-tiny", zamba, ["mlp_activation=silu"], "mlp_activation"),
            ("zamba2-tiny", zamba2, ["pattern=MM1MM0MM1M"], "order"),
            ("zamba2-tiny", zamba2, ["shared_lora_rank=null", "shared_lora_attention=false"], "shared_lora_rank"),
            ("zamba-tiny", zamba2, [], "cannot be a Zamba2")):
        with pytest.raises(UserError, match=text):
            module.config_to_hf(load_model_config(preset, override))


@pytest.mark.parametrize("preset", ["zamba-tiny", "zamba2-tiny"])
def test_tp2_equals_tp1(tmp_path, preset):
    """Logits, loss and every gradient: the shared blocks (summed over uses), the per-use linears and adapters
    (A replicated, its gradient partial over TP), the multi-head Mamba, with and without sequence parallelism."""
    ref = run_tp_layout(tmp_path, preset, 1, False)
    assert any(name.startswith("shared.0.attention") for name in ref["grads"])
    for sp in (False, True):
        assert_same_numbers(run_tp_layout(tmp_path, preset, 2, sp), ref)
