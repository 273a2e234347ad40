"""RWKV-6 (Finch) time mix ``W`` and RWKV channel mix ``C``: the chunked WKV equals the recurrence, decoding equals
the forward pass, causality, packed documents, and two independent references: fla's naive recurrent RWKV-6 and
BlinkDL's ``rwkv`` package (0.8.32, its pure-torch v6.0 path) on a whole model built from our weights."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from chimera.models.causal_lm import build_model
from chimera.models.config import ModelConfig
from chimera.models.mixers.rwkv6 import wkv, wkv_step
from chimera.models.spec import Build
from chimera.models.sublayer import build_mixer
from chimera.parallel.dims import ParallelDims
from chimera.parallel.sharding import initialize_parameters
from helpers import assert_causal

FINCH = dict(vocab_size=320, d_model=64, rwkv_head_size=16, rwkv_chunk=8, norm="layernorm", embedding_norm=True,
             norm_eps=1e-5, tie_embeddings=False)


def finch_config(**overrides) -> ModelConfig:
    return ModelConfig(**{"pattern": "WC", "num_layers": 4, **FINCH, **overrides})


def perturb(module, seed=0, scale=0.1):
    """Every parameter moved off its init (zero LoRAs, unit norms), so every path of the math is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def finch_model(seed=0, **overrides):
    return perturb(build_model(finch_config(**overrides), seed=seed).double(), seed)


def mixer(symbol, **overrides):
    cfg = finch_config(**overrides)
    m = build_mixer(symbol, cfg, Build.of(cfg, ParallelDims()))
    initialize_parameters(m, 0)
    return perturb(m.double()), cfg


def x_seq(s=37, b=2, d=64, seed=1):
    return torch.randn(s, b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def wkv_inputs(s=37, b=2, h=3, n=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(s, b, h, n, generator=g, dtype=dtype) for _ in range(3))
    log_w = -torch.exp(torch.randn(s, b, h, n, generator=g, dtype=dtype) - 1.0)  # decays in (0, 1), some near 0
    u = torch.randn(h, n, generator=g, dtype=dtype)
    return r, k, v, log_w, u


def recurrence(r, k, v, log_w, u, reset=None):
    """The WKV one token at a time (``wkv_step``), state dropped at resets."""
    state = torch.zeros(*r.shape[1:], r.shape[-1], dtype=r.dtype)
    out = []
    for t in range(r.shape[0]):
        if reset is not None:
            state = state * (~reset[t]).to(state.dtype)[:, None, None, None]
        o, state = wkv_step(r[t], k[t], v[t], log_w[t].exp(), u, state)
        out.append(o)
    return torch.stack(out)


@pytest.mark.parametrize("chunk", [1, 8, 16, 64])
def test_chunked_wkv_equals_the_recurrence(chunk):
    r, k, v, log_w, u = wkv_inputs()  # 37 tokens: the last chunk is partial (but for chunk 1)
    reset = torch.zeros(37, 2, dtype=torch.bool)
    reset[[5, 8, 16, 17, 30], 0] = True  # documents' first tokens, one at a chunk start, two in a row
    reset[24, 1] = True
    for starts in (None, reset):
        torch.testing.assert_close(wkv(r, k, v, log_w, u, chunk, starts), recurrence(r, k, v, log_w, u, starts),
                                   rtol=1e-9, atol=1e-9)


def test_wkv_gradients_equal_the_recurrence():
    inputs = [t.requires_grad_() for t in wkv_inputs(s=20)]
    reset = torch.zeros(20, 2, dtype=torch.bool)
    reset[9, 1] = True
    weights = torch.randn(20, 2, 3, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = [torch.autograd.grad((f(*inputs, reset) * weights).sum(), inputs)
             for f in (lambda *a: wkv(*a[:5], 8, a[5]), recurrence)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_wkv_equals_fla_naive_recurrent_rwkv6():
    """fla's ``ops/rwkv6/recurrent_naive.py`` (loaded by file path: ``import fla.ops`` needs triton), ``scale=1``."""
    spec = importlib.util.find_spec("fla")
    path = Path(spec.submodule_search_locations[0]) / "ops/rwkv6/recurrent_naive.py"
    module_spec = importlib.util.spec_from_file_location("fla_rwkv6_recurrent_naive", path)
    fla_naive = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(fla_naive)
    r, k, v, log_w, u = wkv_inputs(s=45, dtype=torch.float32)
    ours = wkv(r, k, v, log_w, u, 16)  # [s, b, h, n]

    def bhtn(t):
        return t.permute(1, 2, 0, 3).contiguous()

    theirs, _ = fla_naive.naive_recurrent_rwkv6(bhtn(r), bhtn(k), bhtn(v), bhtn(log_w), u, scale=1.0)
    torch.testing.assert_close(ours, theirs.permute(2, 0, 1, 3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symbol", ["W", "C"])
def test_decoding_steps_equal_full_forward(symbol):
    m, _ = mixer(symbol)
    x = x_seq()
    full = m(x)
    state = m.init_state(batch=2, max_len=37)
    steps = torch.cat([m.step(x[t: t + 1], state, t) for t in range(37)])
    torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("symbol", ["W", "C"])
def test_causality(symbol):
    m, _ = mixer(symbol)
    assert_causal(m, x_seq())


def test_model_decoding_equals_forward():
    model = finch_model()
    ids = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    state = model.init_state(2, 30)
    steps = torch.stack([model.step(ids[:, t], state, t) for t in range(30)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-9)


def test_packed_documents_equal_documents_run_separately():
    """Token shift and WKV state start afresh at every document's first token (chunk 8: starts inside a chunk,
    at a chunk start, one-token documents)."""
    model = finch_model()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 320, (n,), generator=g) for n in (7, 9, 1, 22, 1)]
    ids = torch.cat(docs)[None]
    seg = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    packed = model(ids, segment_ids=seg, position_ids=pos)[0]
    separate = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, separate, rtol=1e-10, atol=1e-10)
    assert (model(ids)[0] - separate).abs().max() > 1e-3  # without boundaries the documents see each other


def test_bad_head_size_is_one_clear_line():
    with pytest.raises(ValueError, match=r"rwkv_head_size=24 does not divide d_model=64; choose a divisor"):
        finch_config(rwkv_head_size=24)


def blinkdl_state_dict(model, layers: int) -> dict:
    """Our weights under BlinkDL's names and shapes (``[1, 1, d]`` vectors): blocks of (time mix, channel mix)."""
    ours = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    out = {"emb.weight": ours["embed.weight"]}
    for i in range(layers):
        att, ffn = f"layers.{2 * i}.", f"layers.{2 * i + 1}."
        if i == 0:
            out["blocks.0.ln0.weight"], out["blocks.0.ln0.bias"] = ours["embed_norm.weight"], ours["embed_norm.bias"]
        for ln, src in (("ln1", att), ("ln2", ffn)):
            out[f"blocks.{i}.{ln}.weight"], out[f"blocks.{i}.{ln}.bias"] = ours[src + "norm.weight"], ours[
                src + "norm.bias"]
        for name, t in ours.items():
            for src, dst in ((att, "att"), (ffn, "ffn")):
                if name.startswith(src + "mixer."):
                    key = name.removeprefix(src + "mixer.")
                    vector = key.startswith("time_maa_") and t.dim() == 1 or key == "time_decay"
                    out[f"blocks.{i}.{dst}.{key}"] = t.view(1, 1, -1) if vector else t
    out["ln_out.weight"], out["ln_out.bias"] = ours["final_norm.weight"], ours["final_norm.bias"]
    out["head.weight"] = ours["head.weight"]
    return out


def test_whole_model_equals_blinkdl_rwkv(tmp_path, monkeypatch):
    """BlinkDL's ``rwkv`` 0.8.32 (RWKV_JIT_ON=0, RWKV_CUDA_ON=0, strategy "cpu fp32") runs its v6.0 path on a state
    dict built from our weights; fp32 logits agree to 1e-5 of their largest (measured: max |diff| 1.5e-5 on
    logits up to 6.4, 2.3e-6 relative)."""
    monkeypatch.setenv("RWKV_JIT_ON", "0")
    monkeypatch.setenv("RWKV_CUDA_ON", "0")
    from rwkv.model import RWKV

    layers = 3
    model = perturb(build_model(finch_config(num_layers=2 * layers), seed=4), 4, scale=0.2).eval()
    torch.save(blinkdl_state_dict(model, layers), tmp_path / "finch.pth")
    theirs = RWKV(str(tmp_path / "finch.pth"), "cpu fp32", verbose=False)
    assert math.isclose(theirs.version, 6.0) and theirs.args.n_head == 4
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = model(ids)[0]
    logits, _ = theirs.forward(ids[0].tolist(), None, full_output=True)
    assert (logits - ours).abs().max() <= 1e-5 * max(1.0, ours.abs().max().item())
    assert ours.abs().max() > 0.1  # a model that computes something
