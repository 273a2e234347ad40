"""``--format gguf``: one ``model.gguf`` that llama.cpp runs, for the architectures it has (``ARCHITECTURES``).

From Chimera's weights to llama.cpp's in two steps. First the tensors transformers would hold
(``chimera.models.hf``, with the same ``check_expressible`` as HF export: a model GGUF writes is exactly one an
HF class can express, whose numerics Chimera's tests pin down). Then llama.cpp's names (``gguf.TENSOR_NAMES``) and
layouts, as its converter (``convert_hf_to_gguf.py``) makes them from those tensors:

* Llama (``llama``): q and k rows permuted within each head from rotate-half RoPE pairs ``(i, i + d/2)`` to the
  adjacent pairs ``(2i, 2i + 1)`` llama.cpp rotates; no ``output`` when the head is tied (llama.cpp then uses
  ``token_embd``); Llama-3 RoPE scaling as ``rope_freqs`` (each pair's frequency divisor).
* Mamba (``mamba``): the conv weight ``[c, 1, k]`` squeezed to ``[c, k]``; ``ssm_a = -exp(A_log)``.
* Jamba (``jamba``): attention without RoPE (so no permutation) or Mamba with its dt/B/C norms, per layer; each
  MoE's experts stacked ``[E, ...]``; the router stays fp32.
* Mamba-2 (``mamba2``): like Mamba, ``ssm_a`` and ``ssm_d`` as ``[heads, 1]``, ``dt_bias`` as ``ssm_dt.bias``, the
  gated norm's weight as ``[groups, d_inner / groups]`` (a norm per group).
* Granite-4.0-H (``granitehybrid``): attention (permuted as Llama's) or Mamba-2 per layer, the experts' and the
  shared MLP's fused gate/up split, Granite's muP multipliers as ``*_scale`` keys.

Shapes: a numpy ``[rows, cols]`` array is ggml's ``{cols, rows}`` (``GGUFReader`` reports those reversed dims).
Dtypes as llama.cpp requires: 1-D tensors, norms, convolutions and the tensors without a ``.weight`` suffix
(``ssm_a``, ``ssm_d``, biases) and MoE routers stay fp32; the matrices take the export dtype (fp32, fp16 or bf16).
The tokenizer travels in the file (``chimera.export.gguf_vocab``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from gguf import (
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
    quants,
)

from chimera.errors import UserError
from chimera.export import gguf_vocab
from chimera.export.source import ExportSource
from chimera.models.hf import export_state, mapping_for

FILE = "model.gguf"
SSM_CONTEXT = 2**20  # a pure SSM has no position limit; llama.cpp's converter writes this "arbitrary value"

Tensors = dict[str, torch.Tensor]


def tensor_name(kind: MODEL_TENSOR, block: int | None = None, suffix: str = ".weight") -> str:
    return TENSOR_NAMES[kind].format(bid=block) + suffix


# ---- Llama ---------------------------------------------------------------------------------------

def rope_pairs_adjacent(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The rows of each head's block reordered ``0, d/2, 1, d/2 + 1, ...``: the rotate-half pairs ``(i, i + d/2)``
    of HF and Chimera become the adjacent pairs llama.cpp's ``llama`` RoPE rotates."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_frequency_divisors(cfg) -> torch.Tensor:
    """``rope_freqs``: llama.cpp divides pair ``i``'s base frequency by entry ``i``; Chimera's scaled frequencies
    (``Rope.frequencies``) are the base ones divided by exactly these."""
    from chimera.models.mixers.attention import rope_of

    rope = rope_of(cfg.sublayer("*"))
    return replace(rope, scaling="none").frequencies() / rope.frequencies()


def model_ends(hf: Tensors, final_norm: str, embeddings: str = "model.embed_tokens.weight"
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """The token embedding, the final norm and the output head (absent when tied to the embedding)."""
    yield tensor_name(MODEL_TENSOR.TOKEN_EMBD), hf[embeddings]
    yield tensor_name(MODEL_TENSOR.OUTPUT_NORM), hf[final_norm]
    if "lm_head.weight" in hf:
        yield tensor_name(MODEL_TENSOR.OUTPUT), hf["lm_head.weight"]


def llama_tensors(hf: Tensors, cfg) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model_ends(hf, "model.norm.weight")
    for i in range(len(cfg.layers) // 2):
        p = f"model.layers.{i}."
        yield tensor_name(MODEL_TENSOR.ATTN_NORM, i), hf[p + "input_layernorm.weight"]
        yield tensor_name(MODEL_TENSOR.ATTN_Q, i), rope_pairs_adjacent(hf[p + "self_attn.q_proj.weight"],
                                                                       cfg.num_heads)
        yield tensor_name(MODEL_TENSOR.ATTN_K, i), rope_pairs_adjacent(hf[p + "self_attn.k_proj.weight"],
                                                                       cfg.num_kv_heads)
        yield tensor_name(MODEL_TENSOR.ATTN_V, i), hf[p + "self_attn.v_proj.weight"]
        yield tensor_name(MODEL_TENSOR.ATTN_OUT, i), hf[p + "self_attn.o_proj.weight"]
        yield tensor_name(MODEL_TENSOR.FFN_NORM, i), hf[p + "post_attention_layernorm.weight"]
        yield tensor_name(MODEL_TENSOR.FFN_GATE, i), hf[p + "mlp.gate_proj.weight"]
        yield tensor_name(MODEL_TENSOR.FFN_UP, i), hf[p + "mlp.up_proj.weight"]
        yield tensor_name(MODEL_TENSOR.FFN_DOWN, i), hf[p + "mlp.down_proj.weight"]
    if cfg.rope_scaling == "llama3":
        yield tensor_name(MODEL_TENSOR.ROPE_FREQS), rope_frequency_divisors(cfg)


def llama_metadata(w: GGUFWriter, source: ExportSource) -> None:
    cfg = source.model_cfg
    head_dim = cfg.effective("head_dim")
    # the context it was trained at, or the HF export's max_position_embeddings when longer (an imported model's run
    # keeps the default seq_len; llama.cpp takes this as its default context)
    hf_positions = mapping_for("llama").config_to_hf(cfg)["max_position_embeddings"]
    w.add_context_length(max(source.run.data.seq_len, hf_positions))
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(len(cfg.layers) // 2)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg.rope_base)
    if cfg.rope_scaling == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_factor)
    w.add_layer_norm_rms_eps(cfg.norm_eps)


# ---- Mamba and Mamba-2 (HF's "backbone" naming) --------------------------------------------------

def backbone_tensors(hf: Tensors, cfg, mixer: Callable[[str, int], Iterator]) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model_ends(hf, "backbone.norm_f.weight", "backbone.embeddings.weight")
    for i in range(len(cfg.layers)):
        yield tensor_name(MODEL_TENSOR.ATTN_NORM, i), hf[f"backbone.layers.{i}.norm.weight"]
        yield from mixer(f"backbone.layers.{i}.mixer.", i)


def mamba_mixer_tensors(hf: Tensors, p: str, i: int) -> Iterator[tuple[str, torch.Tensor]]:
    """One HF Mamba-1 mixer under prefix ``p`` as block ``i`` (with Jamba's dt/B/C norms when it has them)."""
    yield tensor_name(MODEL_TENSOR.SSM_IN, i), hf[p + "in_proj.weight"]
    yield tensor_name(MODEL_TENSOR.SSM_CONV1D, i), hf[p + "conv1d.weight"].squeeze(1)
    yield tensor_name(MODEL_TENSOR.SSM_CONV1D, i, ".bias"), hf[p + "conv1d.bias"]
    yield tensor_name(MODEL_TENSOR.SSM_X, i), hf[p + "x_proj.weight"]
    yield tensor_name(MODEL_TENSOR.SSM_DT, i), hf[p + "dt_proj.weight"]
    yield tensor_name(MODEL_TENSOR.SSM_DT, i, ".bias"), hf[p + "dt_proj.bias"]
    yield tensor_name(MODEL_TENSOR.SSM_A, i, ""), -torch.exp(hf[p + "A_log"])
    yield tensor_name(MODEL_TENSOR.SSM_D, i, ""), hf[p + "D"]
    yield tensor_name(MODEL_TENSOR.SSM_OUT, i), hf[p + "out_proj.weight"]
    for kind, norm in ((MODEL_TENSOR.SSM_DT_NORM, "dt"), (MODEL_TENSOR.SSM_B_NORM, "b"),
                       (MODEL_TENSOR.SSM_C_NORM, "c")):
        if f"{p}{norm}_layernorm.weight" in hf:
            yield tensor_name(kind, i), hf[f"{p}{norm}_layernorm.weight"]


def mamba_tensors(hf: Tensors, cfg) -> Iterator[tuple[str, torch.Tensor]]:
    return backbone_tensors(hf, cfg, lambda p, i: mamba_mixer_tensors(hf, p, i))


def ssm_metadata(w: GGUFWriter, cfg) -> None:
    """What llama.cpp's SSM architectures read (it requires feed-forward length and head count: 0, unused)."""
    w.add_context_length(SSM_CONTEXT)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_block_count(len(cfg.layers))
    w.add_ssm_conv_kernel(cfg.conv_kernel)
    w.add_ssm_inner_size(cfg.ssm_expand * cfg.d_model)
    w.add_ssm_state_size(cfg.ssm_state)
    w.add_layer_norm_rms_eps(cfg.norm_eps)


def mamba_metadata(w: GGUFWriter, source: ExportSource) -> None:
    cfg = source.model_cfg
    ssm_metadata(w, cfg)
    w.add_ssm_time_step_rank(cfg.sublayer("m").ssm_dt_rank)
    w.add_ssm_dt_b_c_rms(False)


def mamba2_mixer_tensors(hf: Tensors, cfg, p: str, i: int) -> Iterator[tuple[str, torch.Tensor]]:
    """One HF Mamba-2 mixer under prefix ``p`` as block ``i``."""
    inner, groups = cfg.ssm_expand * cfg.d_model, cfg.ssm_groups
    yield tensor_name(MODEL_TENSOR.SSM_IN, i), hf[p + "in_proj.weight"]
    yield tensor_name(MODEL_TENSOR.SSM_CONV1D, i), hf[p + "conv1d.weight"].squeeze(1)
    yield tensor_name(MODEL_TENSOR.SSM_CONV1D, i, ".bias"), hf[p + "conv1d.bias"]
    yield tensor_name(MODEL_TENSOR.SSM_DT, i, ".bias"), hf[p + "dt_bias"]
    yield tensor_name(MODEL_TENSOR.SSM_A, i, ""), -torch.exp(hf[p + "A_log"]).unsqueeze(-1)
    yield tensor_name(MODEL_TENSOR.SSM_D, i, ""), hf[p + "D"].unsqueeze(-1)
    yield tensor_name(MODEL_TENSOR.SSM_NORM, i), hf[p + "norm.weight"].reshape(groups, inner // groups)
    yield tensor_name(MODEL_TENSOR.SSM_OUT, i), hf[p + "out_proj.weight"]


def mamba2_tensors(hf: Tensors, cfg) -> Iterator[tuple[str, torch.Tensor]]:
    return backbone_tensors(hf, cfg, lambda p, i: mamba2_mixer_tensors(hf, cfg, p, i))


def mamba2_metadata(w: GGUFWriter, source: ExportSource) -> None:
    cfg = source.model_cfg
    ssm_metadata(w, cfg)
    w.add_ssm_time_step_rank(cfg.ssm_expand * cfg.d_model // cfg.ssm_head_dim)  # llama.cpp: the head count
    w.add_ssm_group_count(cfg.ssm_groups)


# ---- Jamba ---------------------------------------------------------------------------------------

def jamba_tensors(hf: Tensors, cfg) -> Iterator[tuple[str, torch.Tensor]]:
    """Attention (no RoPE: no permutation) or Mamba per layer, then a gated MLP or a MoE whose experts are
    stacked ``[E, ...]`` (llama.cpp's ``*_exps``)."""
    yield from model_ends(hf, "model.final_layernorm.weight")
    for i in range(len(cfg.layers) // 2):
        p = f"model.layers.{i}."
        yield tensor_name(MODEL_TENSOR.ATTN_NORM, i), hf[p + "input_layernorm.weight"]
        if cfg.layers[2 * i] == "*":
            for kind, proj in ((MODEL_TENSOR.ATTN_Q, "q"), (MODEL_TENSOR.ATTN_K, "k"), (MODEL_TENSOR.ATTN_V, "v"),
                               (MODEL_TENSOR.ATTN_OUT, "o")):
                yield tensor_name(kind, i), hf[f"{p}self_attn.{proj}_proj.weight"]
        else:
            yield from mamba_mixer_tensors(hf, p + "mamba.", i)
        yield tensor_name(MODEL_TENSOR.FFN_NORM, i), hf[p + "pre_ff_layernorm.weight"]
        f = p + "feed_forward."
        if cfg.layers[2 * i + 1] == "E":
            yield tensor_name(MODEL_TENSOR.FFN_GATE_INP, i), hf[f + "router.weight"]
            for kind, proj in ((MODEL_TENSOR.FFN_GATE_EXP, "gate"), (MODEL_TENSOR.FFN_UP_EXP, "up"),
                               (MODEL_TENSOR.FFN_DOWN_EXP, "down")):
                yield tensor_name(kind, i), torch.stack([hf[f"{f}experts.{j}.{proj}_proj.weight"]
                                                         for j in range(cfg.moe_experts)])
        else:
            for kind, proj in ((MODEL_TENSOR.FFN_GATE, "gate"), (MODEL_TENSOR.FFN_UP, "up"),
                               (MODEL_TENSOR.FFN_DOWN, "down")):
                yield tensor_name(kind, i), hf[f"{f}{proj}_proj.weight"]


def jamba_metadata(w: GGUFWriter, source: ExportSource) -> None:
    """llama.cpp tells a Jamba layer's mixer by its kv-head count: 0 for Mamba."""
    cfg = source.model_cfg
    mixers = cfg.layers[0::2]
    w.add_context_length(source.run.data.seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(len(mixers))
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv([cfg.num_kv_heads if m == "*" else 0 for m in mixers])
    w.add_ssm_conv_kernel(cfg.conv_kernel)
    w.add_ssm_inner_size(cfg.ssm_expand * cfg.d_model)
    w.add_ssm_state_size(cfg.ssm_state)
    w.add_ssm_time_step_rank(cfg.sublayer("m").ssm_dt_rank)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if "E" in cfg.layers:
        w.add_expert_count(cfg.moe_experts)
        w.add_expert_used_count(cfg.moe_top_k)


# ---- Granite-4.0-H --------------------------------------------------------------------------------

def granite_hybrid_tensors(hf: Tensors, cfg) -> Iterator[tuple[str, torch.Tensor]]:
    """Attention (q/k permuted as for Llama, as the converter does even without RoPE: q.k is unchanged) or
    Mamba-2 per layer; the fused ``input_linear`` of the experts and of the shared MLP split into gate and up."""
    moe = cfg.layers[1] == "E"
    yield from model_ends(hf, "model.norm.weight")
    for i in range(len(cfg.layers) // 2):
        p = f"model.layers.{i}."
        yield tensor_name(MODEL_TENSOR.ATTN_NORM, i), hf[p + "input_layernorm.weight"]
        if cfg.layers[2 * i] == "*":
            a = p + "self_attn."
            yield tensor_name(MODEL_TENSOR.ATTN_Q, i), rope_pairs_adjacent(hf[a + "q_proj.weight"], cfg.num_heads)
            yield tensor_name(MODEL_TENSOR.ATTN_K, i), rope_pairs_adjacent(hf[a + "k_proj.weight"], cfg.num_kv_heads)
            yield tensor_name(MODEL_TENSOR.ATTN_V, i), hf[a + "v_proj.weight"]
            yield tensor_name(MODEL_TENSOR.ATTN_OUT, i), hf[a + "o_proj.weight"]
        else:
            yield from mamba2_mixer_tensors(hf, cfg, p + "mamba.", i)
        yield tensor_name(MODEL_TENSOR.FFN_NORM, i), hf[p + "post_attention_layernorm.weight"]
        gate, up = hf[p + "shared_mlp.input_linear.weight"].chunk(2, 0)
        down = hf[p + "shared_mlp.output_linear.weight"]
        if moe:
            sparse = p + "block_sparse_moe."
            yield tensor_name(MODEL_TENSOR.FFN_GATE_INP, i), hf[sparse + "router.layer.weight"]
            expert_gate, expert_up = hf[sparse + "input_linear.weight"].chunk(2, 1)
            yield tensor_name(MODEL_TENSOR.FFN_GATE_EXP, i), expert_gate
            yield tensor_name(MODEL_TENSOR.FFN_UP_EXP, i), expert_up
            yield tensor_name(MODEL_TENSOR.FFN_DOWN_EXP, i), hf[sparse + "output_linear.weight"]
            shared = (MODEL_TENSOR.FFN_GATE_SHEXP, MODEL_TENSOR.FFN_UP_SHEXP, MODEL_TENSOR.FFN_DOWN_SHEXP)
        else:
            shared = (MODEL_TENSOR.FFN_GATE, MODEL_TENSOR.FFN_UP, MODEL_TENSOR.FFN_DOWN)
        for kind, t in zip(shared, (gate, up, down), strict=True):
            yield tensor_name(kind, i), t


def granite_hybrid_metadata(w: GGUFWriter, source: ExportSource) -> None:
    """Llama's keys, Mamba-2's, kv heads per layer (0: Mamba-2), the MoE sizes and Granite's muP multipliers."""
    cfg = source.model_cfg
    mixers, moe = cfg.layers[0::2], cfg.layers[1] == "E"
    w.add_context_length(SSM_CONTEXT if "M" in mixers else source.run.data.seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(len(mixers))
    w.add_feed_forward_length(cfg.sublayer("E").moe_hidden if moe else cfg.mlp_hidden)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv([cfg.num_kv_heads if m == "*" else 0 for m in mixers])
    w.add_rope_dimension_count(cfg.d_model // cfg.num_heads)
    w.add_rope_scaling_finetuned(False)  # llama.cpp's granitehybrid reads this as "uses RoPE"
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if moe:
        w.add_expert_count(cfg.moe_experts)
        w.add_expert_used_count(cfg.moe_top_k)
        w.add_expert_shared_feed_forward_length(cfg.moe_shared_hidden)
    w.add_attention_scale(cfg.attention_scale or cfg.sublayer("*").head_dim ** -0.5)
    w.add_embedding_scale(cfg.embedding_multiplier)
    w.add_residual_scale(cfg.residual_multiplier)
    w.add_logit_scale(cfg.logits_divisor)
    w.add_ssm_conv_kernel(cfg.conv_kernel)
    w.add_ssm_state_size(cfg.ssm_state)
    w.add_ssm_group_count(cfg.ssm_groups)
    w.add_ssm_inner_size(cfg.ssm_expand * cfg.d_model)
    w.add_ssm_time_step_rank(cfg.ssm_expand * cfg.d_model // cfg.ssm_head_dim)


def granite_hybrid_refusal(cfg) -> str | None:
    """What HF's class holds but llama.cpp's granitehybrid does not run."""
    if "*" in cfg.layers and cfg.attention_bias:
        return "attention_bias=true (llama.cpp's granitehybrid attention has no biases)"
    if "*" in cfg.layers and "M" in cfg.layers and cfg.rope_fraction != 0:
        return "RoPE in a hybrid (llama.cpp's granitehybrid with Mamba-2 layers runs attention without positions)"
    return None


# ---- the architectures ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Architecture:
    arch: MODEL_ARCH
    hf_model_type: str  # the mapping (chimera.models.hf) that gives the HF tensors
    metadata: Callable[[GGUFWriter, ExportSource], None]
    tensors: Callable[[Tensors, object], Iterator[tuple[str, torch.Tensor]]]
    refusal: Callable[[object], str | None] = lambda cfg: None  # beyond what the HF class refuses


ARCHITECTURES = {  # by Chimera model family
    "llama": Architecture(MODEL_ARCH.LLAMA, "llama", llama_metadata, llama_tensors),
    "mamba": Architecture(MODEL_ARCH.MAMBA, "mamba", mamba_metadata, mamba_tensors),
    "mamba2": Architecture(MODEL_ARCH.MAMBA2, "mamba2", mamba2_metadata, mamba2_tensors),
    "jamba": Architecture(MODEL_ARCH.JAMBA, "jamba", jamba_metadata, jamba_tensors),
    "granitemoehybrid": Architecture(MODEL_ARCH.GRANITE_HYBRID, "granitemoehybrid", granite_hybrid_metadata,
                                     granite_hybrid_tensors, granite_hybrid_refusal),
}


def _architecture(cfg) -> Architecture:
    """The architecture of a model config; UserError naming what GGUF cannot express."""
    from chimera.trainer.interchange import check_expressible

    if cfg.family not in ARCHITECTURES:
        raise UserError(f"model {cfg.name!r} (family {cfg.family!r}) has no llama.cpp architecture that Chimera "
                        f"writes; GGUF export supports the families {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[cfg.family]
    mapping = mapping_for(arch.hf_model_type)
    try:
        mapping.table(cfg)  # the layer pattern
        check_expressible(mapping, cfg)
    except UserError as e:
        raise UserError(f"GGUF ({MODEL_ARCH_NAMES[arch.arch]}): {e}") from None
    if (why := arch.refusal(cfg)) is not None:
        raise UserError(f"GGUF ({MODEL_ARCH_NAMES[arch.arch]}): llama.cpp cannot run this model's {why}")
    return arch


def refusal(source: ExportSource) -> str | None:
    """Why this model (or its tokenizer) cannot be a llama.cpp GGUF; None when it can."""
    try:
        _architecture(source.model_cfg)
    except UserError as e:
        return str(e)
    return gguf_vocab.refusal(source.tokenizer, source.model_cfg.vocab_size)


FILE_TYPES = {torch.float32: LlamaFileType.ALL_F32, torch.float16: LlamaFileType.MOSTLY_F16,
              torch.bfloat16: LlamaFileType.MOSTLY_BF16}


def keeps_fp32(name: str, t: torch.Tensor) -> bool:
    """The tensors llama.cpp reads in fp32 whatever the file type (its converter's rule)."""
    always = [TENSOR_NAMES[k].split(".")[-1] for k in (MODEL_TENSOR.SSM_CONV1D, MODEL_TENSOR.FFN_GATE_INP)]
    return (t.dim() <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
            or any(f".{kind}." in name for kind in always))


def stored(name: str, t: torch.Tensor, dtype: torch.dtype) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    """A tensor as the numpy array (and raw ggml type, for bf16) written for it."""
    data = t.detach().float().contiguous().numpy()
    if keeps_fp32(name, t) or dtype == torch.float32:
        return data, None
    if dtype == torch.float16:
        return data.astype(np.float16), None
    return quants.quantize(data, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16


def write(source: ExportSource, out_dir: Path, dtype: torch.dtype) -> None:
    cfg = source.model_cfg
    arch = _architecture(cfg)
    if dtype not in FILE_TYPES:
        raise UserError(f"GGUF export writes fp32, fp16 or bf16, not {dtype}")
    vocab = gguf_vocab.vocab_of(source.tokenizer, cfg.vocab_size)
    hf = export_state(mapping_for(arch.hf_model_type), source.state, cfg)

    writer = GGUFWriter(Path(out_dir) / FILE, MODEL_ARCH_NAMES[arch.arch])
    writer.add_name(cfg.name)
    writer.add_description(f"exported by Chimera from {source.checkpoint.name} (step {source.step})")
    writer.add_file_type(FILE_TYPES[dtype])
    writer.add_vocab_size(cfg.vocab_size)
    arch.metadata(writer, source)
    gguf_vocab.add_vocab(writer, vocab)
    for name, t in arch.tensors(hf, cfg):
        data, raw = stored(name, t, dtype)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
