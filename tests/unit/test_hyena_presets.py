"""The Hyena and StripedHyena presets: the published StripedHyena-Hessian-7B has the parameter count of the released
model, counted on the meta device against the ``stripedhyena`` package's own blocks; test-size presets split over
TP=2; whole models decode as they run forward."""

import pytest
import torch
from stripedhyena.layers import ParallelGatedMLP, RMSNorm, VocabParallelEmbedding
from stripedhyena.model import ParallelGatedConvBlock
from stripedhyena.utils import dotdict

from chimera.configs.loader import load_model_config
from chimera.models.causal_lm import meta_model
from helpers import build_model

# togethercomputer/stripedhyena, configs/7b-sh-32k-v1.yml (the released StripedHyena-Hessian-7B): the fields that
# size the model. 32 blocks: attention at the odd indices, Hyena at the even ones.
SH_7B = dotdict(vocab_size=32000, hidden_size=4096, num_filters=4096, num_layers=32, short_filter_length=3,
                num_attention_heads=32, short_filter_bias=True, eps=1e-5, state_size=2, proj_groups=4,
                hyena_filter_groups=1, column_split_hyena=True, model_parallel_size=1, tie_embeddings=False,
                inner_mlp_size=14336, mha_out_proj_bias=False, qkv_proj_bias=False, params_dtype=torch.float32,
                attn_layer_idxs=list(range(1, 32, 2)), hyena_layer_idxs=list(range(0, 32, 2)), use_flashfft=False)
PUBLISHED_7B = 7.65e9  # the HF model page's rounded figure for togethercomputer/StripedHyena-Hessian-7B


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def stripedhyena_7b_parameters() -> int:
    """The released model's parameters, from the package's own modules built on the meta device. Its attention block
    is flash-attn's ``MHA`` (no CPU wheel), counted from its layout: ``Wqkv [(heads + 2 kv heads) head_dim, d]`` and
    ``out_proj [d, d]``, biases off in this config; the rest of that block (two RMSNorms, the gated MLP) is the
    package's."""
    c = SH_7B
    with torch.device("meta"):
        hyena_block = count(ParallelGatedConvBlock(c, 0))
        attention_rest = 2 * count(RMSNorm(c)) + count(ParallelGatedMLP(c))
        embeddings = count(VocabParallelEmbedding(c)) * (1 if c.tie_embeddings else 2) + count(RMSNorm(c))
    head_dim, kv_heads = c.hidden_size // c.num_attention_heads, c.num_attention_heads // c.proj_groups
    mha = (c.num_attention_heads + 2 * kv_heads) * head_dim * c.hidden_size + c.hidden_size**2
    return (len(c.hyena_layer_idxs) * hyena_block + len(c.attn_layer_idxs) * (mha + attention_rest)
            + embeddings)


def test_striped_hyena_7b_parameter_count_equals_the_released_model():
    ours = meta_model(load_model_config("striped-hyena-hessian-7b")).num_parameters()
    released = stripedhyena_7b_parameters()
    assert ours == released == 7_646_023_680
    assert round(released / 1e7) * 1e7 == PUBLISHED_7B


@pytest.mark.parametrize("preset", ["hyena-tiny", "striped-hyena-tiny", "striped-hyena2-tiny"])
def test_tiny_presets_are_test_size_and_split_over_two_ranks(preset):
    cfg = load_model_config(preset)
    assert meta_model(cfg).num_parameters() < 1_000_000 and cfg.vocab_size == 320 and cfg.d_model == 64
    assert cfg.check_tensor_parallel(2) is None


@pytest.mark.parametrize("preset", ["hyena-small", "striped-hyena-small"])
def test_small_presets_are_about_transformer_small(preset):
    ours = meta_model(load_model_config(preset)).num_parameters()
    reference = meta_model(load_model_config("transformer-small")).num_parameters()
    assert abs(ours - reference) < 0.05 * reference


@pytest.mark.parametrize("preset", ["hyena-tiny", "striped-hyena-tiny", "striped-hyena2-tiny"])
def test_model_decoding_equals_forward(single_process, preset):
    model = build_model(preset, seed=1).double().eval()
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    full = model(ids)
    state = model.init_state(2, 24)
    steps = torch.stack([model.step(ids[:, t], state, t) for t in range(24)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-9)
