"""Published-size presets have exactly the parameter count of the matching transformers config
(both models built on the meta device: no weights materialised)."""

import pytest
import torch
import transformers

from chimera.configs.loader import load_model_config
from chimera.models.causal_lm import CausalLM

HF_CONFIGS = {
    "llama2-7b": lambda: transformers.LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, tie_word_embeddings=False),
    "llama-1b": lambda: transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, tie_word_embeddings=False),
    "mamba-130m": lambda: transformers.MambaConfig(
        vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=24, expand=2, conv_kernel=4,
        time_step_rank=48, use_bias=False, use_conv_bias=True, tie_word_embeddings=True),
    "mamba2-130m": lambda: transformers.Mamba2Config(
        vocab_size=50288, hidden_size=768, state_size=128, num_hidden_layers=24, expand=2, head_dim=64, num_heads=24,
        n_groups=1, conv_kernel=4, use_bias=False, use_conv_bias=True, tie_word_embeddings=True),
    "recurrentgemma-2b": lambda: transformers.RecurrentGemmaConfig(  # google/recurrentgemma-2b's config.json
        vocab_size=256000, hidden_size=2560, intermediate_size=15360, num_hidden_layers=26, num_attention_heads=10,
        num_key_value_heads=1, head_dim=256, lru_width=2560, attention_window_size=2048, conv1d_width=4,
        logits_soft_cap=30.0, partial_rotary_factor=0.5, block_types=["recurrent", "recurrent", "attention"]),
    "jamba-v0.1": lambda: transformers.JambaConfig(  # ai21labs/Jamba-v0.1's config.json: 52B total, 12B active
        vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_experts=16, num_experts_per_tok=2, attn_layer_period=8, attn_layer_offset=4,
        expert_layer_period=2, expert_layer_offset=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
        mamba_dt_rank=256, mamba_conv_bias=True, mamba_proj_bias=False, tie_word_embeddings=False),
    "granite-4.0-h-tiny": lambda: transformers.GraniteMoeHybridConfig(  # ibm-granite/granite-4.0-h-tiny: 7B
        vocab_size=100352, hidden_size=1536, intermediate_size=512, shared_intermediate_size=1024,
        num_hidden_layers=40, num_attention_heads=12, num_key_value_heads=4, num_local_experts=64,
        num_experts_per_tok=6, layer_types=["attention" if i % 10 == 5 else "mamba" for i in range(40)],
        mamba_n_heads=48, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128, mamba_d_conv=4,
        mamba_expand=2, mamba_chunk_size=256, mamba_conv_bias=True, mamba_proj_bias=False, tie_word_embeddings=True),
    "zamba-7b": lambda: transformers.ZambaConfig(  # Zyphra/Zamba-7B-v1 (ZambaConfig's defaults are its config)
        vocab_size=32000, hidden_size=3712, intermediate_size=14848, num_hidden_layers=76, num_attention_heads=16,
        num_key_value_heads=16, n_mamba_heads=2, attn_layer_period=6, attn_layer_offset=4, mamba_d_state=16,
        mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=232, tie_word_embeddings=True),
    "zamba2-2.7b": lambda: transformers.Zamba2Config(  # Zyphra/Zamba2-2.7B: 54 layers, 2 shared blocks, LoRA 128
        vocab_size=32000, hidden_size=2560, intermediate_size=10240, num_hidden_layers=54, num_attention_heads=32,
        mamba_d_state=64, n_mamba_heads=80, mamba_ngroups=1, num_mem_blocks=2, adapter_rank=128,
        use_shared_attention_adapter=False, use_mem_rope=False, tie_word_embeddings=True),
}


def count_hf(config) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied weights appear once


@pytest.mark.parametrize("preset", sorted(HF_CONFIGS))
def test_published_preset_parameter_count_equals_hf(single_process, preset):
    with torch.device("meta"):
        ours = CausalLM(load_model_config(preset)).num_parameters()
    assert ours == count_hf(HF_CONFIGS[preset]())
