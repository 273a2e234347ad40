"""transformers ``RecurrentGemmaForCausalLM`` <-> Chimera's Griffin blocks with RecurrentGemma numerics.

HF layer ``i`` (a recurrent or local-attention temporal block, then the MLP) is Chimera sublayers
``2i`` (``R`` or ``L``) and ``2i + 1`` (``-``). Known traps, handled here:

* the RG-LRU gates are block-diagonal, stored ``[heads, in, out]`` and applied ``x @ W`` - the
  same arrangement as ours, so they copy unchanged;
* HF's ``recurrent_param`` is ``-Lambda``: it computes ``log a = -8 r softplus(recurrent_param)``
  where the paper (and we) write ``a = sigma(Lambda)``, ``log a = -softplus(-Lambda)``;
* the temporal conv is ``[width, 1, k]`` there, ``[width, k]`` here;
* numerics: RMSNorm scales by ``1 + w``, embeddings are multiplied by ``sqrt(d)`` rounded to bf16,
  logits are soft-capped, the first token of a sequence enters the RG-LRU unscaled, and the
  recurrent block, attention output and MLP projections carry biases.
"""

from __future__ import annotations

from chimera.errors import UserError
from chimera.models.hf.rope import rope_from_hf, rope_to_hf
from chimera.models.hf.table import Entry, Negate, Unsqueeze, prefixed, rename

MODEL_TYPE = "recurrent_gemma"
RECURRENT = ("linear_y.weight", "linear_y.bias", "linear_x.weight", "linear_x.bias", "linear_out.weight",
             "linear_out.bias", "conv.bias")
GATES = {"rg_lru.input_gate_weight": "rglru.gate_x_weight", "rg_lru.input_gate_bias": "rglru.gate_x_bias",
         "rg_lru.recurrent_gate_weight": "rglru.gate_a_weight", "rg_lru.recurrent_gate_bias": "rglru.gate_a_bias"}
ATTENTION = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "o_proj.bias")


def _block_symbols(block_types: list[str], layers: int) -> str:
    symbols = {"recurrent": "R", "attention": "L"}
    if any(b not in symbols for b in block_types):
        raise UserError(f"unknown RecurrentGemma block types {block_types}")
    return "".join(symbols[block_types[i % len(block_types)]] + "-" for i in range(layers))


def config_from_hf(hf: dict) -> dict:
    if hf.get("attention_bias") or hf.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise UserError("this RecurrentGemma variant (attention bias or another activation) is not supported yet")
    if not hf.get("embeddings_scale_by_sqrt_dim", True) or not hf.get("tie_word_embeddings", True):
        raise UserError("RecurrentGemma without embedding scaling or with an untied head is not supported yet")
    layers = _block_symbols(hf["block_types"], hf["num_hidden_layers"])
    return {
        "name": "recurrent_gemma",
        "family": MODEL_TYPE,
        "pattern": layers,
        "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"],
        "num_heads": hf["num_attention_heads"],
        "num_kv_heads": hf["num_key_value_heads"],
        "head_dim": hf["head_dim"],
        "window": hf["attention_window_size"],
        **rope_from_hf(hf, default_fraction=0.5),
        "mlp_hidden": hf["intermediate_size"] // 2,
        "mlp_activation": "gelu_tanh",
        "rnn_width": hf["lru_width"] or hf["hidden_size"],
        "rnn_heads": hf["num_attention_heads"],
        "conv_kernel": hf["conv1d_width"],
        "norm_eps": hf["rms_norm_eps"],
        "tie_embeddings": True,
        "scale_embeddings": True,
        "norm_offset": True,
        "logits_soft_cap": hf["logits_soft_cap"],
        "linear_bias": True,
        "rglru_reset_unnormalized": True,
    }


def config_to_hf(cfg) -> dict:
    blocks = ["recurrent" if s == "R" else "attention" for s in cfg.layers[::2]]
    return {
        "architectures": ["RecurrentGemmaForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": 2 * cfg.mlp_hidden,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.effective("head_dim"),
        "lru_width": cfg.effective("rnn_width"),
        "attention_window_size": cfg.window,
        "conv1d_width": cfg.conv_kernel,
        "logits_soft_cap": cfg.logits_soft_cap,
        "rms_norm_eps": cfg.norm_eps,
        **rope_to_hf(cfg, with_fraction=True),
        "block_types": blocks,
        "hidden_activation": "gelu_pytorch_tanh",
        "embeddings_scale_by_sqrt_dim": True,
        "attention_bias": False,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def _check(cfg) -> None:
    ok = len(cfg.layers) % 2 == 0 and set(cfg.layers[::2]) <= {"R", "L"} and set(cfg.layers[1::2]) == {"-"}
    numerics = cfg.scale_embeddings and cfg.norm_offset and cfg.linear_bias and cfg.rglru_reset_unnormalized
    heads = "R" not in cfg.layers or cfg.effective("rnn_heads") == cfg.num_heads
    if not ok or not numerics or cfg.logits_soft_cap is None or not heads:
        raise UserError("this model is not a RecurrentGemma: it needs (R|L)- blocks, rnn_heads = num_heads and "
                        "RecurrentGemma's numerics (scale_embeddings, norm_offset, linear_bias, logits_soft_cap, "
                        "rglru_reset_unnormalized)")


def table(cfg) -> list[Entry]:
    _check(cfg)
    rows = [rename("embed.weight", "model.embed_tokens.weight"), rename("final_norm.weight", "model.final_norm.weight")]
    for i, symbol in enumerate(cfg.layers[::2]):
        hf, mix, mlp = f"model.layers.{i}.", f"layers.{2 * i}.", f"layers.{2 * i + 1}."
        rows += [rename(mix + "norm.weight", hf + "temporal_pre_norm.weight"),
                 rename(mlp + "norm.weight", hf + "channel_pre_norm.weight")]
        rows += prefixed(mlp + "mixer.", hf + "mlp_block.",
                         {f"{p}_proj.{w}": f"{p}.{w}" for p in ("gate", "up", "down") for w in ("weight", "bias")})
        block = hf + "temporal_block."
        if symbol == "R":
            rows += prefixed(mix + "mixer.", block, {n.replace("conv.", "conv_1d."): n for n in RECURRENT} | GATES)
            rows += [rename(mix + "mixer.conv.weight", block + "conv_1d.weight", Unsqueeze(1)),  # [w, k] <-> [w, 1, k]
                     rename(mix + "mixer.rglru.a_param", block + "rg_lru.recurrent_param", Negate())]  # -Lambda
        else:
            rows += prefixed(mix + "mixer.", block, ATTENTION)
    return rows
