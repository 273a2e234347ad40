"""StripedHyena's Hyena blocks held to Together's ``stripedhyena`` package (PyPI 0.2.2, a pinned test extra), on the
same weights, fp32: a model of Hyena blocks only (its attention blocks need flash-attn, which has no CPU wheel),
``use_flashfft=False``, ``hyena_filter_groups=1``. Its ``ParallelGatedConvBlock`` is our ``H`` (modal filter, order
2) then ``-`` (gated MLP, SiLU); its parallel forward (FFT) and its decoding (modal-FFT prefill, then ``step_fir`` /
``step_iir``) against ours. Not used as a reference: its ``prefill_style="recurrence"`` path (wrong upstream).

RMSNorm: the package divides by ``rms + eps``, we multiply by ``rsqrt(mean + eps)``; with ``eps = 1e-12`` the two
agree to rounding, so the comparison holds everything else to 1e-5."""

import stripedhyena.model as stripedhyena_model
import torch
from stripedhyena.utils import dotdict

from chimera.models.causal_lm import build_model
from chimera.models.config import ModelConfig

D, HEADS, STATE, VOCAB, BLOCKS, MLP = 64, 4, 2, 96, 2, 128


def ours():
    cfg = ModelConfig(pattern="H-", num_layers=2 * BLOCKS, vocab_size=VOCAB, d_model=D, num_heads=HEADS,
                      hyena_filter="modal", hyena_state=STATE, hyena_short_kernel=3, mlp_hidden=MLP,
                      mlp_activation="silu", tie_embeddings=False, norm_eps=1e-12, init_std=0.1)
    model = build_model(cfg, seed=4)
    with torch.no_grad():  # norms away from 1, so that a misplaced scale shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model.eval()


def theirs(model):
    config = dotdict(
        vocab_size=VOCAB, hidden_size=D, num_filters=D, attn_layer_idxs=[], hyena_layer_idxs=list(range(BLOCKS)),
        num_layers=BLOCKS, short_filter_length=3, num_attention_heads=HEADS, short_filter_bias=True, eps=1e-12,
        state_size=STATE, proj_groups=1, hyena_filter_groups=1, column_split_hyena=True, model_parallel_size=1,
        tie_embeddings=False, inner_mlp_size=MLP, mlp_activation="silu", params_dtype=torch.float32,
        hyena_block_dtype=torch.float32, mlp_dtype=torch.float32, use_flashfft=False, use_flash_depthwise=False,
        use_flash_rmsnorm=False, final_norm=True, prefill_style="fft", max_seqlen=64, max_batch_size=2)
    ref = stripedhyena_model.StripedHyena(config)
    mine = dict(model.named_parameters())
    weights = {"embedding_layer.weight": mine["embed.weight"], "unembed.weight": mine["head.weight"],
               "norm.scale": mine["final_norm.weight"]}
    for j in range(BLOCKS):
        h, m, b = f"layers.{2 * j}.", f"layers.{2 * j + 1}.", f"blocks.{j}."
        weights.update({
            b + "pre_norm.scale": mine[h + "norm.weight"], b + "post_norm.scale": mine[m + "norm.weight"],
            b + "projections.weight": mine[h + "mixer.in_proj.weight"],
            b + "projections.bias": mine[h + "mixer.in_proj.bias"],
            b + "filter.short_filter_weight": mine[h + "mixer.short_conv.weight"].unsqueeze(1),
            b + "filter.short_filter_bias": mine[h + "mixer.short_conv.bias"],
            b + "filter.D": mine[h + "mixer.D"][0],
            b + "filter.poles": mine[h + "mixer.filter.poles"][0].unsqueeze(2),  # [D, S, 1, 2]
            b + "filter.residues": mine[h + "mixer.filter.residues"][0].unsqueeze(2),
            b + "out_filter_dense.weight": mine[h + "mixer.out_proj.weight"],
            b + "out_filter_dense.bias": mine[h + "mixer.out_proj.bias"],
            b + "mlp.l1.weight": mine[m + "mixer.gate.weight"], b + "mlp.l2.weight": mine[m + "mixer.up.weight"],
            b + "mlp.l3.weight": mine[m + "mixer.down.weight"],
        })
    missing, unexpected = ref.load_state_dict({k: v.detach().clone() for k, v in weights.items()}, strict=True)
    assert not missing and not unexpected
    assert len(weights) == len(mine)  # every parameter of ours has its place in theirs, and back
    return ref.float().eval()


def tokens():
    return torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))


def assert_close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@torch.no_grad()
def test_forward_equals_stripedhyena_package():
    model = ours()
    ref = theirs(model)
    ids = tokens()
    want, _ = ref(ids)
    assert_close(model(ids), want)
    assert want.abs().max() > 1.0  # the comparison is not of near-zero numbers


@torch.no_grad()
def test_decoding_equals_stripedhyena_package_prefill_and_steps():
    model = ours()
    ref = theirs(model)
    ids, prompt = tokens(), 25
    params = ref.initialize_inference_params()
    logits, params = ref(ids[:, :prompt], inference_params_dict=params)  # FFT prefill, modal state from it
    want = [logits]
    for t in range(prompt, ids.shape[1]):
        logits, params = ref(ids[:, t : t + 1], inference_params_dict=params)
        want.append(logits)
    want = torch.cat(want, dim=1)
    assert_close(want, ref(ids)[0])  # the package agrees with itself
    state = model.init_state(2, ids.shape[1])
    got = torch.stack([model.step(ids[:, t], state, t) for t in range(ids.shape[1])], dim=1)
    assert_close(got, want)
