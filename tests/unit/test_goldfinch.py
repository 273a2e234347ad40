"""GoldFinch: Finch (RWKV-6) blocks, then GOLD attention blocks over one compressed key cache made once per pass.

Decoding equals the forward pass, causality, packed documents, the cache's size per token, one cache for all GOLD
layers, the published 1.5B architecture's parameter count, and pipeline layouts refused in one line."""

import pytest
import torch

from chimera.configs.loader import load_model_config, load_run_config
from chimera.configs.schema import validate_layout
from chimera.errors import UserError
from chimera.models.causal_lm import build_model, meta_model
from helpers import REPO


def goldfinch(seed=0, scale=0.1):
    model = build_model(load_model_config("goldfinch-tiny"), seed=seed).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every parameter off its init (zero LoRAs, unit norms): every path exercised
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def ids(b=2, s=30, seed=2):
    return torch.randint(0, 320, (b, s), generator=torch.Generator().manual_seed(seed))


def test_decoding_equals_forward():
    model, tokens = goldfinch(), ids()
    full = model(tokens)
    state = model.init_state(2, 30)
    steps = torch.stack([model.step(tokens[:, t], state, t) for t in range(30)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-9)


def test_causal():
    model, tokens = goldfinch(), ids()
    changed = tokens.clone()
    changed[:, 17] = (changed[:, 17] + 1) % 320
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :17], b[:, :17], rtol=0, atol=0)
    assert (a[:, 17:] - b[:, 17:]).abs().max() > 1e-3
    assert (a[:, 29] - b[:, 29]).abs().max() > 1e-6  # the last position still sees it (attention, recurrence)


@pytest.mark.parametrize("lengths", [(7, 18, 1, 12), (5, 9, 1, 12, 3, 8)])  # GOLD: dense mask; in blocks of 12
def test_packed_documents_equal_documents_run_separately(lengths):
    model = goldfinch()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 320, (n,), generator=g) for n in lengths]
    tokens = torch.cat(docs)[None]
    seg = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    packed = model(tokens, segment_ids=seg, position_ids=pos)[0]
    separate = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, separate, rtol=1e-10, atol=1e-10)
    assert (model(tokens)[0] - separate).abs().max() > 1e-3


def test_one_cache_for_all_gold_layers():
    model = goldfinch()
    gold = [layer.mixer for layer in model.layers if layer.symbol == "G"]
    assert [hasattr(m, "compress") for m in gold] == [True, False]  # the first GOLD layer builds it


def test_cache_bytes_per_token():
    """The decoding state grows by d / 16 numbers and one int32 token id per position for the whole model."""
    model = meta_model(load_model_config("goldfinch-1.5b")).to(torch.bfloat16)

    def state_bytes(n):
        total = 0
        for layer in model.init_state(1, n):
            total += sum(t.numel() * t.element_size() for t in (layer or {}).values())
        return total

    assert state_bytes(2048) - state_bytes(1024) == 1024 * (2048 // 16 * 2 + 4)


def count_authors_goldfinch(d=2048, vocab=65536, blocks=24, inv_ratio=3, compression=16, head_size=64) -> int:
    """The parameters of recursal/GoldFinch-paper's ``Transformer`` for configs/L24D2048ctx4096minipile.yaml with
    ``tmix2: gold`` (its ``src/model.py``, ``tmix/tmix_x060.py``, ``tmix/tmix_gold.py``, ``cmix/cmix_x060.py``;
    Finch layers: ``tmix: x060``, the default), written out from their ``nn.Parameter`` / ``nn.Linear`` shapes."""
    ffn = int(d * 3.5) // 32 * 32  # dim_ffn's default
    mix, decay, value = 32, 64, max(d // 16, 64)  # D_MIX_LORA, D_DECAY_LORA, D_VALUE_LORA
    finch_blocks = int(blocks * (inv_ratio - 1) / inv_ratio)  # get_second_submodel_layer_id
    heads = d // head_size
    x060 = 6 * d + d * 5 * mix + 5 * mix * d + d + d * decay + decay * d + heads * head_size + 5 * d * d + 2 * d
    gold = 5 * d + d * mix + mix * d + d * 2 * mix + 2 * mix * d + 2 * (d * value + value * d) + 2 * d * d + 4 * 2 * d
    cmix = 2 * d + ffn * d + d * d + d * ffn
    block_norms = 2 * 2 * d  # ln1, ln2
    cache = (d // compression) * d + (d // compression + d) * d  # w_kv_cache_a, w_kv_cache_b
    return (vocab * d + 2 * d  # emb, ln0
            + finch_blocks * (x060 + cmix + block_norms) + (blocks - finch_blocks) * (gold + cmix + block_norms)
            + cache + 2 * d + d * vocab)  # ln_out, head


def test_published_1_5b_parameter_count():
    ours = meta_model(load_model_config("goldfinch-1.5b")).num_parameters()
    assert ours == count_authors_goldfinch() == 1_508_171_776


def test_pipeline_layouts_are_refused_in_one_line():
    cfg = load_run_config(REPO / "configs/runs/tiny.yaml", ["model.preset=goldfinch-tiny", "parallel.pipeline=2"])
    with pytest.raises(UserError, match=r"parallel.pipeline=2: sublayer 'G' .* set parallel.pipeline=1"):
        validate_layout(cfg, 2)


def test_activation_checkpointing_keeps_every_gradient():
    """Recomputing the layers in backward (the first GOLD layer publishes the cache again) changes no gradient."""
    grads = []
    for checkpointing in (False, True):
        model = goldfinch().train()
        model.activation_checkpointing = checkpointing
        tokens = ids()
        model(tokens, labels=torch.roll(tokens, -1, 1)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-12, atol=0, msg=name)
