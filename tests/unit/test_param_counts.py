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
