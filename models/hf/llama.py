"""transformers ``LlamaForCausalLM`` <-> Chimera's ``*-`` pattern (attention sublayer, SwiGLU sublayer).

Layer ``i`` of Llama is Chimera sublayers ``2i`` (``input_layernorm`` + attention) and ``2i + 1``
(``post_attention_layernorm`` + MLP). RoPE (rotate-half pairs over the whole head), GQA's head to
kv-head assignment and RMSNorm agree exactly, so the mapping is a renaming.
"""

from __future__ import annotations

from chimera.errors import UserError
from chimera.models.hf.rope import rope_from_hf, rope_to_hf
from chimera.models.hf.table import Entry, embeddings, prefixed, rename

MODEL_TYPE = "llama"


def config_from_hf(hf: dict) -> dict:
    unsupported = {k: hf.get(k) for k in ("attention_bias", "mlp_bias") if hf.get(k)}
    if hf.get("hidden_act", "silu") != "silu":
        unsupported["hidden_act"] = hf["hidden_act"]
    if unsupported:
        raise UserError(f"this Llama variant is not supported yet: {unsupported}")
    heads = hf["num_attention_heads"]
    return {
        "name": "llama",
        "family": MODEL_TYPE,
        "pattern": "*-",
        "num_layers": 2 * hf["num_hidden_layers"],
        "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"],
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        "mlp_hidden": hf["intermediate_size"],
        "mlp_activation": "silu",
        **rope_from_hf(hf),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def config_to_hf(cfg) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": len(cfg.layers) // 2,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.effective("head_dim"),
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        **rope_to_hf(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": max(4096, cfg.rope_original_max_positions + 1),
        "torch_dtype": "float32",
    }


def table(cfg) -> list[Entry]:
    if cfg.layers != "*-" * (len(cfg.layers) // 2):
        raise UserError(f"a Llama model has the pattern '*-' repeated, not {cfg.layers!r}")
    rows = embeddings(cfg, "model.embed_tokens.weight") + [rename("final_norm.weight", "model.norm.weight")]
    for i in range(len(cfg.layers) // 2):
        hf, att, mlp = f"model.layers.{i}.", f"layers.{2 * i}.", f"layers.{2 * i + 1}."
        rows += [rename(att + "norm.weight", hf + "input_layernorm.weight"),
                 rename(mlp + "norm.weight", hf + "post_attention_layernorm.weight")]
        rows += prefixed(att + "mixer.", hf + "self_attn.", {f"{p}_proj.weight": f"{p}_proj.weight" for p in "qkvo"})
        rows += prefixed(mlp + "mixer.", hf + "mlp.",
                         {f"{p}_proj.weight": f"{p}.weight" for p in ("gate", "up", "down")})
    return rows
