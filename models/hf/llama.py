"""transformers ``LlamaForCausalLM`` <-> Chimera's ``*-`` pattern (attention sublayer, SwiGLU sublayer).

Layer ``i`` of Llama is Chimera sublayers ``2i`` (``input_layernorm`` + attention) and ``2i + 1``
(``post_attention_layernorm`` + MLP). RoPE (rotate-half pairs over the whole head), GQA's head to
kv-head assignment and RMSNorm agree exactly, so the mapping is a renaming.
"""

from __future__ import annotations

from chimera.errors import UserError

MODEL_TYPE = "llama"


def config_from_hf(hf: dict) -> dict:
    unsupported = {k: hf.get(k) for k in ("attention_bias", "mlp_bias") if hf.get(k)}
    if hf.get("rope_scaling"):
        unsupported["rope_scaling"] = hf["rope_scaling"]
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
        "rope_base": float(hf.get("rope_theta", 10000.0)),
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
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": 4096,
        "torch_dtype": "float32",
    }


def names(cfg) -> list[tuple[str, str]]:
    """(HF name, Chimera name) of every parameter."""
    if cfg.layers != "*-" * (len(cfg.layers) // 2):
        raise UserError(f"a Llama model has the pattern '*-' repeated, not {cfg.layers!r}")
    pairs = [("model.embed_tokens.weight", "embed.weight"), ("model.norm.weight", "final_norm.weight")]
    for i in range(len(cfg.layers) // 2):
        hf, att, mlp = f"model.layers.{i}", f"layers.{2 * i}", f"layers.{2 * i + 1}"
        pairs += [(f"{hf}.input_layernorm.weight", f"{att}.norm.weight"),
                  (f"{hf}.post_attention_layernorm.weight", f"{mlp}.norm.weight")]
        pairs += [(f"{hf}.self_attn.{p}_proj.weight", f"{att}.mixer.{p}_proj.weight") for p in "qkvo"]
        pairs += [(f"{hf}.mlp.{p}_proj.weight", f"{mlp}.mixer.{p}.weight") for p in ("gate", "up", "down")]
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", "head.weight"))
    return pairs


def hf_shapes(cfg) -> dict:
    d, hd, v, m = cfg.d_model, cfg.head_size, cfg.vocab_size, cfg.mlp_hidden
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shape = {"embed_tokens": (v, d), "norm": (d,), "layernorm": (d,), "q_proj": (q, d), "k_proj": (kv, d),
             "v_proj": (kv, d), "o_proj": (d, q), "gate_proj": (m, d), "up_proj": (m, d), "down_proj": (d, m),
             "lm_head": (v, d)}
    return {hf: next(s for key, s in shape.items() if hf.split(".")[-2].endswith(key)) for hf, _ in names(cfg)}


def to_chimera(tensors: dict, cfg) -> dict:
    tensors = dict(tensors)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # tied: the embedding serves as the head
    return {ours: tensors[hf] for hf, ours in names(cfg)}


def to_hf(state: dict, cfg) -> dict:
    return {hf: state[ours] for hf, ours in names(cfg)}
