"""GGUF export (llama.cpp's file format) of tiny random models, read back with the ``gguf`` package's reader.

Each written tensor is compared with the transformation of Chimera's own weights, computed here from Chimera's
parameter names (independently of the HF tables the writer goes through); the metadata llama.cpp reads is
checked by value. Then the model is run from the file's tensors the way llama.cpp runs them (adjacent-pair RoPE,
its Mamba / Mamba-2 recurrences, tied output from ``token_embd``): the logits equal Chimera's. The tokenizer in
the file, rebuilt as a byte-level BPE from its tokens and merges, tokenizes as the run's tokenizer does.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, GGUFReader, TokenType

from chimera.configs.loader import load_model_config
from chimera.data.tokenizers import get_tokenizer, train_bpe
from chimera.export import gguf as gguf_export
from chimera.export.source import load_source
from chimera.models.hf import llama as hf_llama
from chimera.trainer.checkpoint import write_weights_checkpoint
from helpers import build_model, run_chimera_here

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def source_of(tmp_path, preset: str, overrides=(), tokenizer: str | None = None, seed: int = 0):
    model = build_model(preset, seed=seed, overrides=overrides)
    cfg = load_model_config(preset, list(overrides))
    with torch.no_grad():  # random init leaves some tensors at their defaults: make every one distinct
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    write_weights_checkpoint(tmp_path / "run", cfg, {k: v.detach() for k, v in model.state_dict().items()},
                             source="test")
    source = load_source(tmp_path / "run")
    if tokenizer is not None:
        run = source.run.model_copy(update={"data": source.run.data.model_copy(update={"tokenizer": tokenizer})})
        source = dataclasses.replace(source, run=run)
    return source


def export(tmp_path, source, dtype=torch.float32) -> GGUFReader:
    out = tmp_path / "out"
    out.mkdir(parents=True)
    gguf_export.write(source, out, dtype)
    assert sorted(p.name for p in out.iterdir()) == ["model.gguf"]
    return GGUFReader(out / "model.gguf")


def tensors_of(reader: GGUFReader) -> dict[str, torch.Tensor]:
    """Each tensor in its numpy shape (ggml's dims reversed) and stored dtype."""
    out = {}
    for t in reader.tensors:
        dims = tuple(reversed([int(d) for d in t.shape]))
        if t.tensor_type == GGMLQuantizationType.BF16:
            value = torch.from_numpy(t.data.view(np.int16).copy()).view(torch.bfloat16).reshape(dims)
        else:
            value = torch.from_numpy(t.data.copy()).reshape(dims)
        assert tuple(t.data.shape[:len(dims) - 1]) == dims[:-1]  # the reader's array is numpy-ordered
        out[t.name] = value
    return out


def fields_of(reader: GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def assert_stored(got: dict, expected: dict, dtype: torch.dtype) -> None:
    """Same names; 1-D tensors, norms, convs, routers and suffix-less tensors in fp32, the rest in ``dtype``; equal
    values."""
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        fp32 = (want.dim() <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
                or any(kind in name for kind in ("conv1d", "ffn_gate_inp")))
        want = want.float() if fp32 else want.to(dtype)
        assert got[name].dtype == want.dtype, name
        assert torch.equal(got[name], want), name


def rope_rows_adjacent(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Row ``j`` of head ``h`` in llama.cpp's layout is row ``j // 2 + (j % 2) * d / 2`` of the rotate-half one."""
    d = w.shape[0] // heads
    return w[[h * d + j // 2 + (j % 2) * (d // 2) for h in range(heads) for j in range(d)]]


# ---- Llama -----------------------------------------------------------------------------------------

def llama_expected(state: dict, cfg) -> dict:
    out = {"token_embd.weight": state["embed.weight"], "output_norm.weight": state["final_norm.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = state["head.weight"]
    for i in range(len(cfg.layers) // 2):
        att, mlp, b = f"layers.{2 * i}.", f"layers.{2 * i + 1}.", f"blk.{i}."
        out |= {b + "attn_norm.weight": state[att + "norm.weight"],
                b + "attn_q.weight": rope_rows_adjacent(state[att + "mixer.q_proj.weight"], cfg.num_heads),
                b + "attn_k.weight": rope_rows_adjacent(state[att + "mixer.k_proj.weight"], cfg.num_kv_heads),
                b + "attn_v.weight": state[att + "mixer.v_proj.weight"],
                b + "attn_output.weight": state[att + "mixer.o_proj.weight"],
                b + "ffn_norm.weight": state[mlp + "norm.weight"],
                b + "ffn_gate.weight": state[mlp + "mixer.gate.weight"],
                b + "ffn_up.weight": state[mlp + "mixer.up.weight"],
                b + "ffn_down.weight": state[mlp + "mixer.down.weight"]}
    return out


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def llama_cpp_logits(t: dict, meta: dict, ids: torch.Tensor) -> torch.Tensor:
    """A ``llama`` GGUF run as llama.cpp runs it: RoPE rotates adjacent pairs (2i, 2i+1) of each head, with
    frequency ``base^(-2i/d) / rope_freqs[i]``; GQA; SwiGLU; the output matrix or else ``token_embd``."""
    a = "llama."
    heads, kv, eps = meta[a + "attention.head_count"], meta[a + "attention.head_count_kv"], \
        meta[a + "attention.layer_norm_rms_epsilon"]
    d = meta[a + "rope.dimension_count"]
    s = ids.shape[0]
    freqs = meta[a + "rope.freq_base"] ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    if "rope_freqs.weight" in t:
        freqs = freqs / t["rope_freqs.weight"].double()
    if meta.get(a + "rope.scaling.type") == "linear":
        freqs = freqs / meta[a + "rope.scaling.factor"]
    angle = torch.arange(s, dtype=torch.float64)[:, None] * freqs  # [s, d/2]
    cos, sin = angle.cos().float(), angle.sin().float()

    def rope(x):  # [s, h, d]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        c, n = cos[:, None], sin[:, None]
        return torch.stack([x0 * c - x1 * n, x0 * n + x1 * c], -1).flatten(-2)

    h = t["token_embd.weight"][ids]
    for i in range(meta[a + "block_count"]):
        b = lambda n, i=i: t[f"blk.{i}.{n}.weight"]  # noqa: E731
        x = rms(h, b("attn_norm"), eps)
        q = rope((x @ b("attn_q").T).view(s, heads, d))
        k = rope((x @ b("attn_k").T).view(s, kv, d)).repeat_interleave(heads // kv, 1)
        v = (x @ b("attn_v").T).view(s, kv, d).repeat_interleave(heads // kv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        h = h + torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(s, -1) @ b("attn_output").T
        x = rms(h, b("ffn_norm"), eps)
        h = h + (F.silu(x @ b("ffn_gate").T) * (x @ b("ffn_up").T)) @ b("ffn_down").T
    out = t.get("output.weight", t["token_embd.weight"])
    return rms(h, t["output_norm.weight"], eps) @ out.T


def chimera_logits(source, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return source.build_model()(ids[None])[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_llama_tensors_and_metadata(tmp_path, dtype, single_process):
    source = source_of(tmp_path, "llama-tiny")
    cfg = source.model_cfg
    reader = export(tmp_path, source, DTYPES[dtype])
    assert_stored(tensors_of(reader), llama_expected(source.state, cfg), DTYPES[dtype])
    meta = fields_of(reader)
    expected = {"general.architecture": "llama", "general.file_type": {"fp32": 0, "fp16": 1, "bf16": 32}[dtype],
                "llama.block_count": len(cfg.layers) // 2,
                "llama.context_length": hf_llama.config_to_hf(cfg)["max_position_embeddings"],  # as the HF export
                "llama.embedding_length": cfg.d_model, "llama.feed_forward_length": cfg.mlp_hidden,
                "llama.attention.head_count": cfg.num_heads, "llama.attention.head_count_kv": cfg.num_kv_heads,
                "llama.rope.dimension_count": cfg.d_model // cfg.num_heads, "llama.vocab_size": cfg.vocab_size,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.eos_token_id": 256}
    assert {k: meta.get(k) for k in expected} == expected
    assert meta["llama.rope.freq_base"] == pytest.approx(cfg.rope_base)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    assert len(meta["tokenizer.ggml.tokens"]) == len(meta["tokenizer.ggml.token_type"]) == cfg.vocab_size


@pytest.mark.parametrize("overrides", [(), ("tie_embeddings=true",), ("rope_scaling=llama3", "rope_factor=8.0",
                                       "rope_original_max_positions=8", "rope_base=500000.0"),
                                       ("rope_scaling=linear", "rope_factor=4.0")],
                         ids=["untied", "tied", "llama3-rope", "linear-rope"])
def test_llama_runs_from_the_file_as_llama_cpp_runs_it(tmp_path, overrides, single_process):
    """The q/k permutation, the tied output, rope_freqs and the scaling metadata, checked by what they compute."""
    source = source_of(tmp_path, "llama-tiny", overrides)
    reader = export(tmp_path, source)
    t = tensors_of(reader)
    assert ("output.weight" in t) == (not source.model_cfg.tie_embeddings)
    assert ("rope_freqs.weight" in t) == ("rope_scaling=llama3" in overrides)
    ids = torch.randint(0, source.model_cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(llama_cpp_logits(t, fields_of(reader), ids), chimera_logits(source, ids),
                               atol=1e-4, rtol=1e-4)


# ---- Mamba and Mamba-2 -----------------------------------------------------------------------------

def mamba_mixer_expected(state: dict, m: str, b: str) -> dict:
    """Our Mamba-1 mixer under prefix ``m`` as GGUF block prefix ``b``."""
    return {b + "ssm_in.weight": torch.cat([state[m + "in_proj_x.weight"], state[m + "in_proj_z.weight"]]),
            b + "ssm_conv1d.weight": state[m + "conv1d.weight"], b + "ssm_conv1d.bias": state[m + "conv1d.bias"],
            b + "ssm_x.weight": state[m + "x_proj.weight"],
            b + "ssm_dt.weight": state[m + "dt_proj.weight"], b + "ssm_dt.bias": state[m + "dt_proj.bias"],
            b + "ssm_a": -torch.exp(state[m + "A_log"]), b + "ssm_d": state[m + "D"],
            b + "ssm_out.weight": state[m + "out_proj.weight"]}


def mamba_expected(state: dict, cfg) -> dict:
    out = {"token_embd.weight": state["embed.weight"], "output_norm.weight": state["final_norm.weight"]}
    for i in range(len(cfg.layers)):
        out |= {f"blk.{i}.attn_norm.weight": state[f"layers.{i}.norm.weight"]}
        out |= mamba_mixer_expected(state, f"layers.{i}.mixer.", f"blk.{i}.")
    return out


def causal_conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """llama.cpp's ssm_conv: channel c at time t is sum_j w[c, j] x[t - k + 1 + j, c] (zeros before the start)."""
    k = w.shape[1]
    padded = torch.cat([x.new_zeros(k - 1, x.shape[1]), x])
    return sum(w[:, j] * padded[j:j + x.shape[0]] for j in range(k)) + bias


def mamba_cpp_mixer(b, x: torch.Tensor, meta: dict, a: str) -> torch.Tensor:
    """llama.cpp's Mamba-1 mixer, one step at a time: h_t = exp(dt A) h + dt B x_t, y_t = C h_t + D x_t, gated by
    silu(z); dt, B and C RMS-normalised first when the block has ``ssm_{dt,b,c}_norm`` (Jamba)."""
    eps, inner, n, rank = (meta[a + k] for k in ("attention.layer_norm_rms_epsilon", "ssm.inner_size",
                                                  "ssm.state_size", "ssm.time_step_rank"))
    x, z = (x @ b("ssm_in.weight").T).split(inner, -1)
    x = F.silu(causal_conv(x, b("ssm_conv1d.weight"), b("ssm_conv1d.bias")))
    dt, B, C = (x @ b("ssm_x.weight").T).split([rank, n, n], -1)
    if b("ssm_dt_norm.weight") is not None:
        dt, B, C = rms(dt, b("ssm_dt_norm.weight"), eps), rms(B, b("ssm_b_norm.weight"), eps), \
            rms(C, b("ssm_c_norm.weight"), eps)
    dt = F.softplus(dt @ b("ssm_dt.weight").T + b("ssm_dt.bias"))
    state, ys = torch.zeros(inner, n), []
    for s in range(x.shape[0]):
        state = torch.exp(dt[s, :, None] * b("ssm_a")) * state + dt[s, :, None] * B[s] * x[s, :, None]
        ys.append(state @ C[s] + b("ssm_d") * x[s])
    return (torch.stack(ys) * F.silu(z)) @ b("ssm_out.weight").T


def mamba_cpp_logits(t: dict, meta: dict, ids: torch.Tensor) -> torch.Tensor:
    """A ``mamba`` GGUF run as llama.cpp runs it: norm, mixer, residual; the output is ``token_embd``."""
    eps = meta["mamba.attention.layer_norm_rms_epsilon"]
    h = t["token_embd.weight"][ids]
    for i in range(meta["mamba.block_count"]):
        b = lambda n, i=i: t.get(f"blk.{i}.{n}")  # noqa: E731
        h = h + mamba_cpp_mixer(b, rms(h, b("attn_norm.weight"), eps), meta, "mamba.")
    return rms(h, t["output_norm.weight"], eps) @ t["token_embd.weight"].T


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_mamba_tensors_metadata_and_logits(tmp_path, dtype, single_process):
    source = source_of(tmp_path, "mamba-tiny")
    cfg = source.model_cfg
    reader = export(tmp_path, source, DTYPES[dtype])
    t = tensors_of(reader)
    assert_stored(t, mamba_expected(source.state, cfg), DTYPES[dtype])
    meta = fields_of(reader)
    expected = {"general.architecture": "mamba", "mamba.block_count": len(cfg.layers),
                "mamba.embedding_length": cfg.d_model, "mamba.context_length": 2**20,
                "mamba.ssm.conv_kernel": cfg.conv_kernel, "mamba.ssm.inner_size": cfg.ssm_expand * cfg.d_model,
                "mamba.ssm.state_size": cfg.ssm_state, "mamba.ssm.time_step_rank": math.ceil(cfg.d_model / 16),
                "mamba.ssm.dt_b_c_rms": False, "tokenizer.ggml.model": "gpt2"}
    assert {k: meta.get(k) for k in expected} == expected
    assert meta["mamba.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    if dtype == "fp32":
        ids = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(mamba_cpp_logits(t, meta, ids), chimera_logits(source, ids), atol=1e-4, rtol=1e-4)


def mamba2_mixer_expected(state: dict, cfg, m: str, b: str) -> dict:
    """Our Mamba-2 mixer under prefix ``m`` as GGUF block prefix ``b``."""
    inner, g, n = cfg.ssm_expand * cfg.d_model, cfg.ssm_groups, cfg.ssm_state

    def b_then_c(t):  # ours [G, (B, C), N] -> [B (G, N), C (G, N)]
        return t.reshape(g, 2, n, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    return {b + "ssm_in.weight": torch.cat([state[m + "in_proj_z.weight"], state[m + "in_proj_x.weight"],
                                            b_then_c(state[m + "in_proj_bc.weight"]), state[m + "in_proj_dt.weight"]]),
            b + "ssm_conv1d.weight": torch.cat([state[m + "conv_x.weight"], b_then_c(state[m + "conv_bc.weight"])]),
            b + "ssm_conv1d.bias": torch.cat([state[m + "conv_x.bias"], b_then_c(state[m + "conv_bc.bias"])]),
            b + "ssm_dt.bias": state[m + "dt_bias"],
            b + "ssm_a": -torch.exp(state[m + "A_log"])[:, None], b + "ssm_d": state[m + "D"][:, None],
            b + "ssm_norm.weight": state[m + "norm_weight"].reshape(g, inner // g),
            b + "ssm_out.weight": state[m + "out_proj.weight"]}


def mamba2_expected(state: dict, cfg) -> dict:
    out = {"token_embd.weight": state["embed.weight"], "output_norm.weight": state["final_norm.weight"]}
    for i in range(len(cfg.layers)):
        out |= {f"blk.{i}.attn_norm.weight": state[f"layers.{i}.norm.weight"]}
        out |= mamba2_mixer_expected(state, cfg, f"layers.{i}.mixer.", f"blk.{i}.")
    return out


def mamba2_cpp_mixer(b, x: torch.Tensor, meta: dict, a: str) -> torch.Tensor:
    """llama.cpp's Mamba-2 mixer: per head a scalar decay exp(dt A), B and C shared within a group, then
    y * silu(z) RMS-normalised per group."""
    eps, inner, n, heads, g = (meta[a + k] for k in ("attention.layer_norm_rms_epsilon", "ssm.inner_size",
                                                      "ssm.state_size", "ssm.time_step_rank", "ssm.group_count"))
    s = x.shape[0]
    z, xbc, dt = (x @ b("ssm_in.weight").T).split([inner, inner + 2 * g * n, heads], -1)
    x, B, C = F.silu(causal_conv(xbc, b("ssm_conv1d.weight"), b("ssm_conv1d.bias"))).split([inner, g * n, g * n], -1)
    dt = F.softplus(dt + b("ssm_dt.bias"))  # [s, H]
    group = torch.arange(heads) // (heads // g)
    B, C, x = B.view(s, g, n)[:, group], C.view(s, g, n)[:, group], x.view(s, heads, inner // heads)
    state, ys = torch.zeros(heads, inner // heads, n), []
    for t in range(s):
        decay = torch.exp(dt[t] * b("ssm_a")[:, 0])
        state = decay[:, None, None] * state + dt[t, :, None, None] * x[t, :, :, None] * B[t, :, None, :]
        ys.append(torch.einsum("hpn,hn->hp", state, C[t]) + b("ssm_d") * x[t])
    y = (torch.stack(ys).reshape(s, inner) * F.silu(z)).view(s, g, inner // g)
    return rms(y, b("ssm_norm.weight"), eps).reshape(s, inner) @ b("ssm_out.weight").T


def mamba2_cpp_logits(t: dict, meta: dict, ids: torch.Tensor) -> torch.Tensor:
    eps = meta["mamba2.attention.layer_norm_rms_epsilon"]
    h = t["token_embd.weight"][ids]
    for i in range(meta["mamba2.block_count"]):
        b = lambda n, i=i: t.get(f"blk.{i}.{n}")  # noqa: E731
        h = h + mamba2_cpp_mixer(b, rms(h, b("attn_norm.weight"), eps), meta, "mamba2.")
    return rms(h, t["output_norm.weight"], eps) @ t["token_embd.weight"].T


def test_mamba2_tensors_metadata_and_logits(tmp_path, single_process):
    source = source_of(tmp_path, "mamba2-tiny")
    cfg = source.model_cfg
    reader = export(tmp_path, source, torch.float16)
    assert_stored(tensors_of(reader), mamba2_expected(source.state, cfg), torch.float16)
    meta = fields_of(reader)
    expected = {"general.architecture": "mamba2", "mamba2.block_count": len(cfg.layers),
                "mamba2.embedding_length": cfg.d_model, "mamba2.ssm.conv_kernel": cfg.conv_kernel,
                "mamba2.ssm.inner_size": cfg.ssm_expand * cfg.d_model, "mamba2.ssm.state_size": cfg.ssm_state,
                "mamba2.ssm.time_step_rank": cfg.ssm_expand * cfg.d_model // cfg.ssm_head_dim,
                "mamba2.ssm.group_count": cfg.ssm_groups, "mamba2.context_length": 2**20}
    assert {k: meta.get(k) for k in expected} == expected

    reader = export(tmp_path / "fp32", source)
    ids = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mamba2_cpp_logits(tensors_of(reader), fields_of(reader), ids),
                               chimera_logits(source, ids), atol=1e-4, rtol=1e-4)


def jamba_expected(state: dict, cfg) -> dict:
    out = {"token_embd.weight": state["embed.weight"], "output_norm.weight": state["final_norm.weight"],
           "output.weight": state["head.weight"]}
    for i in range(len(cfg.layers) // 2):
        mix, ffn, b = f"layers.{2 * i}.", f"layers.{2 * i + 1}.", f"blk.{i}."
        out |= {b + "attn_norm.weight": state[mix + "norm.weight"], b + "ffn_norm.weight": state[ffn + "norm.weight"]}
        if cfg.layers[2 * i] == "*":  # no RoPE, so no permutation
            out |= {b + f"attn_{g}.weight": state[f"{mix}mixer.{p}_proj.weight"]
                    for g, p in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o"))}
        else:
            out |= mamba_mixer_expected(state, mix + "mixer.", b)
            out |= {b + f"ssm_{n}_norm.weight": state[f"{mix}mixer.{n}_layernorm.weight"] for n in ("dt", "b", "c")}
        if cfg.layers[2 * i + 1] == "E":
            out |= {b + "ffn_gate_inp.weight": state[ffn + "mixer.router.weight"]}
            out |= {b + f"ffn_{p}_exps.weight": state[f"{ffn}mixer.{p}_weight"] for p in ("gate", "up", "down")}
        else:
            out |= {b + f"ffn_{p}.weight": state[f"{ffn}mixer.{p}.weight"] for p in ("gate", "up", "down")}
    return out


def jamba_cpp_logits(t: dict, meta: dict, ids: torch.Tensor) -> torch.Tensor:
    """A ``jamba`` GGUF run as llama.cpp runs it: a layer with kv heads attends (no positions), one without is
    Mamba; a layer with a router takes softmax, then its top-k experts' SwiGLU weighted as they are."""
    a = "jamba."
    eps, heads, top_k = meta[a + "attention.layer_norm_rms_epsilon"], meta[a + "attention.head_count"], \
        meta[a + "expert_used_count"]
    s = ids.shape[0]
    h = t["token_embd.weight"][ids]
    for i, kv in enumerate(meta[a + "attention.head_count_kv"]):
        b = lambda n, i=i: t.get(f"blk.{i}.{n}")  # noqa: E731
        x = rms(h, b("attn_norm.weight"), eps)
        if kv:
            d = b("attn_q.weight").shape[0] // heads
            q = (x @ b("attn_q.weight").T).view(s, heads, d)
            k = (x @ b("attn_k.weight").T).view(s, kv, d).repeat_interleave(heads // kv, 1)
            v = (x @ b("attn_v.weight").T).view(s, kv, d).repeat_interleave(heads // kv, 1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
            scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
            h = h + torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(s, -1) @ b("attn_output.weight").T
        else:
            h = h + mamba_cpp_mixer(b, x, meta, a)
        x = rms(h, b("ffn_norm.weight"), eps)
        if b("ffn_gate_inp.weight") is not None:
            weights, chosen = (x @ b("ffn_gate_inp.weight").T).softmax(-1).topk(top_k, -1)
            y = torch.zeros_like(x)
            for e in range(b("ffn_gate_inp.weight").shape[0]):
                w_e = (weights * (chosen == e)).sum(-1, keepdim=True)
                gate, up, down = (b(f"ffn_{p}_exps.weight")[e] for p in ("gate", "up", "down"))
                y = y + w_e * ((F.silu(x @ gate.T) * (x @ up.T)) @ down.T)
            h = h + y
        else:
            h = h + (F.silu(x @ b("ffn_gate.weight").T) * (x @ b("ffn_up.weight").T)) @ b("ffn_down.weight").T
    return rms(h, t["output_norm.weight"], eps) @ t["output.weight"].T


def test_jamba_tensors_metadata_and_logits(tmp_path, single_process):
    source = source_of(tmp_path, "jamba-tiny")
    cfg = source.model_cfg
    reader = export(tmp_path / "bf16", source, torch.bfloat16)
    assert_stored(tensors_of(reader), jamba_expected(source.state, cfg), torch.bfloat16)
    meta = fields_of(reader)
    mixers = cfg.layers[0::2]
    expected = {"general.architecture": "jamba", "jamba.block_count": len(mixers),
                "jamba.attention.head_count_kv": [cfg.num_kv_heads if m == "*" else 0 for m in mixers],
                "jamba.attention.head_count": cfg.num_heads, "jamba.feed_forward_length": cfg.mlp_hidden,
                "jamba.expert_count": cfg.moe_experts, "jamba.expert_used_count": cfg.moe_top_k,
                "jamba.ssm.time_step_rank": cfg.ssm_dt_rank, "jamba.ssm.state_size": cfg.ssm_state}
    assert {k: meta.get(k) for k in expected} == expected
    reader = export(tmp_path, source)
    ids = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(jamba_cpp_logits(tensors_of(reader), fields_of(reader), ids),
                               chimera_logits(source, ids), atol=1e-4, rtol=1e-4)


def granite_expected(state: dict, cfg) -> dict:
    out = {"token_embd.weight": state["embed.weight"], "output_norm.weight": state["final_norm.weight"]}
    for i in range(len(cfg.layers) // 2):
        mix, ffn, b = f"layers.{2 * i}.", f"layers.{2 * i + 1}.", f"blk.{i}."
        out |= {b + "attn_norm.weight": state[mix + "norm.weight"], b + "ffn_norm.weight": state[ffn + "norm.weight"],
                b + "ffn_gate_inp.weight": state[ffn + "mixer.router.weight"]}
        if cfg.layers[2 * i] == "*":
            out |= {b + "attn_q.weight": rope_rows_adjacent(state[mix + "mixer.q_proj.weight"], cfg.num_heads),
                    b + "attn_k.weight": rope_rows_adjacent(state[mix + "mixer.k_proj.weight"], cfg.num_kv_heads),
                    b + "attn_v.weight": state[mix + "mixer.v_proj.weight"],
                    b + "attn_output.weight": state[mix + "mixer.o_proj.weight"]}
        else:
            out |= mamba2_mixer_expected(state, cfg, mix + "mixer.", b)
        out |= {b + f"ffn_{p}_exps.weight": state[f"{ffn}mixer.{p}_weight"] for p in ("gate", "up", "down")}
        out |= {b + f"ffn_{p}_shexp.weight": state[f"{ffn}mixer.shared_expert.{p}.weight"]
                for p in ("gate", "up", "down")}
    return out


def granite_cpp_logits(t: dict, meta: dict, ids: torch.Tensor) -> torch.Tensor:
    """A ``granitehybrid`` GGUF run as llama.cpp runs it: embeddings times ``embedding_scale``; per layer attention
    without positions (softmax scale ``attention.scale``) or Mamba-2, then top-k experts renormalised plus the
    shared expert, each branch times ``residual_scale``; logits divided by ``logit_scale``."""
    a = "granitehybrid."
    eps, heads, top_k = meta[a + "attention.layer_norm_rms_epsilon"], meta[a + "attention.head_count"], \
        meta[a + "expert_used_count"]
    s = ids.shape[0]
    h = t["token_embd.weight"][ids] * meta[a + "embedding_scale"]
    residual = meta[a + "residual_scale"]
    for i, kv in enumerate(meta[a + "attention.head_count_kv"]):
        b = lambda n, i=i: t.get(f"blk.{i}.{n}")  # noqa: E731
        x = rms(h, b("attn_norm.weight"), eps)
        if kv:
            d = b("attn_q.weight").shape[0] // heads
            q = (x @ b("attn_q.weight").T).view(s, heads, d)
            k = (x @ b("attn_k.weight").T).view(s, kv, d).repeat_interleave(heads // kv, 1)
            v = (x @ b("attn_v.weight").T).view(s, kv, d).repeat_interleave(heads // kv, 1)
            scores = torch.einsum("qhd,khd->hqk", q, k) * meta[a + "attention.scale"]
            scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
            y = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(s, -1) @ b("attn_output.weight").T
        else:
            y = mamba2_cpp_mixer(b, x, meta, a)
        h = h + residual * y
        x = rms(h, b("ffn_norm.weight"), eps)
        weights, chosen = (x @ b("ffn_gate_inp.weight").T).softmax(-1).topk(top_k, -1)
        weights = weights / weights.sum(-1, keepdim=True)
        y = (F.silu(x @ b("ffn_gate_shexp.weight").T) * (x @ b("ffn_up_shexp.weight").T)) @ b("ffn_down_shexp.weight").T
        for e in range(b("ffn_gate_inp.weight").shape[0]):
            w_e = (weights * (chosen == e)).sum(-1, keepdim=True)
            gate, up, down = (b(f"ffn_{p}_exps.weight")[e] for p in ("gate", "up", "down"))
            y = y + w_e * ((F.silu(x @ gate.T) * (x @ up.T)) @ down.T)
        h = h + residual * y
    return rms(h, t["output_norm.weight"], eps) @ t["token_embd.weight"].T / meta[a + "logit_scale"]


def test_granite_hybrid_tensors_metadata_and_logits(tmp_path, single_process):
    source = source_of(tmp_path, "granite-tiny")
    cfg = source.model_cfg
    reader = export(tmp_path / "fp16", source, torch.float16)
    assert_stored(tensors_of(reader), granite_expected(source.state, cfg), torch.float16)
    meta = fields_of(reader)
    mixers = cfg.layers[0::2]
    expected = {"general.architecture": "granitehybrid", "granitehybrid.block_count": len(mixers),
                "granitehybrid.attention.head_count_kv": [cfg.num_kv_heads if m == "*" else 0 for m in mixers],
                "granitehybrid.expert_count": cfg.moe_experts, "granitehybrid.expert_used_count": cfg.moe_top_k,
                "granitehybrid.expert_shared_feed_forward_length": cfg.moe_shared_hidden,
                "granitehybrid.feed_forward_length": cfg.moe_hidden, "granitehybrid.rope.scaling.finetuned": False,
                "granitehybrid.ssm.group_count": cfg.ssm_groups, "granitehybrid.ssm.state_size": cfg.ssm_state}
    assert {k: meta.get(k) for k in expected} == expected
    for key, value in (("embedding_scale", cfg.embedding_multiplier), ("residual_scale", cfg.residual_multiplier),
                       ("logit_scale", cfg.logits_divisor), ("attention.scale", cfg.attention_scale)):
        assert meta[f"granitehybrid.{key}"] == pytest.approx(value)
    reader = export(tmp_path / "fp32", source)
    ids = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(granite_cpp_logits(tensors_of(reader), fields_of(reader), ids),
                               chimera_logits(source, ids), atol=1e-4, rtol=1e-4)


# ---- tokenizers ------------------------------------------------------------------------------------

def pre_tokenizer(name: str):
    """llama.cpp's pre-tokenizer ``name`` in HF ``tokenizers``: its regex split, then bytes as GPT-2's symbols."""
    from tokenizers import Regex, pre_tokenizers

    if name == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
    assert name == "llama-bpe"
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(llama3), "isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def bpe_of(meta: dict):
    """The file's vocabulary as a byte-level BPE of HF ``tokenizers`` (what llama.cpp's gpt2 vocabulary is)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {tok: i for i, tok in enumerate(tokens) if types[i] != TokenType.UNUSED}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    merges = [m for m in merges if m[0] + m[1] in vocab]  # tokenizers needs each merge's result in the vocabulary
    bpe = Tokenizer(models.BPE(vocab, merges))
    bpe.pre_tokenizer = pre_tokenizer(meta["tokenizer.ggml.pre"])
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(tokens[i], special=True) for i, ty in enumerate(types)
                            if ty == TokenType.CONTROL])
    assert all(bpe.token_to_id(tokens[i]) == i for i, ty in enumerate(types) if ty != TokenType.UNUSED)
    return bpe


TEXT = "Hello wörld! 3.14 naïve  tabs\tand\nnewlines, ünïcödé ✓ and more text to tokenize."


def test_byte_tokenizer_in_the_file(tmp_path, single_process):
    source = source_of(tmp_path, "mamba-tiny")
    meta = fields_of(export(tmp_path, source))
    types = meta["tokenizer.ggml.token_type"]
    assert types[:256] == [TokenType.NORMAL] * 256 and types[256] == TokenType.CONTROL
    assert types[257:] == [TokenType.UNUSED] * (source.model_cfg.vocab_size - 257)
    assert meta["tokenizer.ggml.eos_token_id"] == 256 and meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.merges"] == ["<|endoftext|> <|endoftext|>"]  # llama.cpp needs one; it never fires
    bpe = bpe_of(meta)
    ids = bpe.encode(TEXT + "<|endoftext|>" + TEXT).ids
    want = get_tokenizer("bytes").encode(TEXT.encode())
    assert ids == [*want.tolist(), 256, *want.tolist()]
    assert bpe.decode(want.tolist()) == TEXT


def test_dna_tokenizer_in_the_file(tmp_path, single_process):
    meta = fields_of(export(tmp_path, source_of(tmp_path, "mamba-tiny", tokenizer="dna")))
    assert meta["tokenizer.ggml.tokens"][:6] == ["A", "C", "G", "T", "N", "<|endoftext|>"]
    assert meta["tokenizer.ggml.eos_token_id"] == 5
    seq = "ACGTNNACGGT"
    assert bpe_of(meta).encode(seq + "<|endoftext|>" + seq).ids == [*get_tokenizer("dna").encode(seq), 5,
                                                                     *get_tokenizer("dna").encode(seq)]


def train_llama3_style_bpe(texts, vocab_size: int, out):
    """A byte-level BPE split as Llama 3's is (a ``Split`` on its regex, then ``ByteLevel`` without one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer("llama-bpe")
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    out.parent.mkdir(parents=True)
    tok.save(str(out))
    return out


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe"])
def test_hf_bpe_tokenizer_in_the_file(tmp_path, pre, single_process):
    texts = [TEXT * 3, "the quick brown fox jumps over the lazy dog " * 20, "def f(x):\n    return x + 1\n" * 10,
             "numbers 1234567 and 'quoted' words, I've they'll\r\n\r\nnext"]
    train = train_bpe if pre == "gpt-2" else train_llama3_style_bpe
    path = train(texts, 300, tmp_path / "tok/tokenizer.json")
    tok = get_tokenizer(str(path))
    source = source_of(tmp_path, "llama-tiny", tokenizer=str(path))
    meta = fields_of(export(tmp_path, source))
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == pre
    assert len(meta["tokenizer.ggml.merges"]) > 10
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert meta["tokenizer.ggml.token_type"][tok.eos_id] == TokenType.CONTROL
    assert meta["tokenizer.ggml.token_type"][tok.vocab_size:] == [TokenType.UNUSED] * (320 - tok.vocab_size)
    bpe = bpe_of(meta)
    for text in texts + ["unseen words: zebra quixotic 12345"]:
        assert bpe.encode(text).ids == tok.encode(text).tolist()


def sentencepiece_style_bpe(texts, out, spacing: str):
    """A byte-fallback BPE over ``▁``-spaced text, laid out as transformers writes Llama 2's: ``<unk> <s> </s>``,
    the 256 byte tokens, then the learnt ones; spaces made ``▁`` by a normaliser that may prepend one, or by a
    ``Metaspace`` pre-tokenizer that prepends one."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    learnt = Tokenizer(models.BPE())
    learnt.normalizer = normalizers.Replace(" ", "\u2581")
    learnt.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    vocab = {t: i for i, t in enumerate(head)}
    for t, _ in sorted(learnt.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in json.loads(learnt.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if spacing == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    else:
        steps = [normalizers.Prepend("\u2581")] if spacing == "space-prefix" else []
        tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    out.parent.mkdir(parents=True)
    tok.save(str(out))
    return out


def llama_cpp_spm_encode(meta: dict, text: str) -> list[int]:
    """llama.cpp's SentencePiece tokenization of a vocabulary: spaces as ▁ (one prepended when add_space_prefix),
    characters as symbols, repeatedly the adjacent pair whose concatenation is a token of the highest score
    (leftmost on ties) merged, then each symbol its token or, failing that, its bytes' <0xXX> tokens."""
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    ids = {t: i for i, t in enumerate(tokens)}
    text = ("\u2581" if meta["tokenizer.ggml.add_space_prefix"] else "") + text.replace(" ", "\u2581")
    symbols = list(text)
    while True:
        pairs = [(scores[ids[a + b]], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:], strict=False))
                 if a + b in ids]
        if not pairs:
            break
        i = -max(pairs)[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return [j for sym in symbols for j in ([ids[sym]] if sym in ids else
                                           [ids[f"<0x{b:02X}>"] for b in sym.encode("utf-8")])]


@pytest.mark.parametrize("spacing", ["space-prefix", "no-prefix", "metaspace"])
def test_sentencepiece_style_tokenizer_in_the_file(tmp_path, spacing, single_process):
    texts = [TEXT * 3, "the quick brown fox jumps over the lazy dog " * 20, "def f(x):\n    return x + 1\n" * 10]
    path = sentencepiece_style_bpe(texts, tmp_path / "tok/tokenizer.json", spacing)
    prepend = spacing != "no-prefix"
    tok = get_tokenizer(str(path))
    meta = fields_of(export(tmp_path, source_of(tmp_path, "llama-tiny", ["vocab_size=512"], tokenizer=str(path))))
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is prepend
    types = meta["tokenizer.ggml.token_type"]
    assert types[0] == TokenType.UNKNOWN and types[3:259] == [TokenType.BYTE] * 256
    assert meta["tokenizer.ggml.unknown_token_id"] == 0 and meta["tokenizer.ggml.eos_token_id"] == tok.eos_id
    for text in texts + ["unseen words: zebra quixotic ✓ 12345 ünï"]:
        assert llama_cpp_spm_encode(meta, text) == tok.encode(text).tolist(), text


# ---- refusals --------------------------------------------------------------------------------------

def test_refusals(tmp_path, single_process):
    from tokenizers import Tokenizer, models

    assert gguf_export.refusal(source_of(tmp_path / "a", "llama-tiny")) is None
    griffin = gguf_export.refusal(source_of(tmp_path / "b", "griffin-tiny"))
    assert "has no llama.cpp architecture" in griffin and "llama, mamba, mamba2" in griffin
    scaled = gguf_export.refusal(source_of(tmp_path / "c", "llama-tiny", ["residual_multiplier=0.5"]))
    assert "cannot express this model's residual_multiplier" in scaled
    biased = gguf_export.refusal(source_of(tmp_path / "f", "granite-tiny", ["attention_bias=true"]))
    assert "llama.cpp cannot run this model's attention_bias=true" in biased
    words = tmp_path / "words.json"
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(words))
    refused = gguf_export.refusal(source_of(tmp_path / "d", "mamba-tiny", tokenizer=str(words)))
    assert "WordLevel tokenizer" in refused and "writes BPE tokenizers only" in refused
    with pytest.raises(Exception, match="has no llama.cpp architecture"):
        (tmp_path / "e").mkdir()
        gguf_export.write(source_of(tmp_path / "b2", "griffin-tiny"), tmp_path / "e", torch.float32)
    assert not list((tmp_path / "e").iterdir())


def test_chimera_export_format_gguf(tmp_path, single_process):
    """Through the command line: a file of ordinary permissions and only it (the tokenizer is inside); a model
    llama.cpp cannot run is one line with exit 2 and nothing written."""
    source = source_of(tmp_path, "mamba-tiny")
    proc = run_chimera_here("export", tmp_path / "run", "--format", "gguf", "--out", tmp_path / "gguf", "--dtype",
                            "bf16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["model.gguf"]
    assert (tmp_path / "gguf/model.gguf").stat().st_mode & 0o777 == 0o644
    reader = GGUFReader(tmp_path / "gguf/model.gguf")
    assert fields_of(reader)["general.file_type"] == 32
    assert_stored(tensors_of(reader), mamba_expected(source.state, source.model_cfg), torch.bfloat16)

    source_of(tmp_path / "g", "griffin-tiny")
    proc = run_chimera_here("export", tmp_path / "g/run", "--format", "gguf", "--out", tmp_path / "g/gguf")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "has no llama.cpp architecture" in lines[0], proc.stderr
    assert not (tmp_path / "g/gguf").exists()
