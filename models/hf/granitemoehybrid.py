"""transformers ``GraniteMoeHybridForCausalLM`` (IBM Granite-4.0-H) <-> Chimera's ``M``/``*`` mixers and ``E``/``-``.

Granite layer ``i`` is Chimera sublayers ``2i`` (``input_layernorm`` + the mixer) and ``2i + 1``
(``post_attention_layernorm`` + the feed-forward)::

    mixer i = Mamba-2 ("M")  if layer_types[i] is "mamba" / "linear_attention"
              attention ("*") if it is "attention" / "full_attention"
    ffn i   = MoE with a shared expert ("E", moe_shared_hidden)  if num_local_experts > 0
              gated MLP ("-")                                   if num_local_experts == 0 (dense Granite)

HF's feed-forward is ``block_sparse_moe(h) + shared_mlp(h)``: the routed experts plus a dense gated MLP
on every token, which is our MoE's always-on shared expert. A Granite config becomes one explicit
pattern (``num_layers`` unset).

Numerics beyond Chimera's defaults (all four are muP multipliers, carried over as is):
``embedding_multiplier`` (embeddings times it), ``residual_multiplier`` (each sublayer's output times
it before the residual add), ``attention_multiplier`` (the softmax scale, replacing ``1/sqrt(d_head)``:
``attention_scale``), ``logits_scaling`` (logits divided by it: ``logits_divisor``). The router takes
top-k of the logits, then a softmax over those k, which is softmax-then-top-k renormalised
(``moe_normalize_top_k``); dropless. RoPE only with ``position_embedding_type: "rope"`` (released
Granite-4.0-H models are NoPE: ``rope_fraction: 0``); ``attention_bias`` puts biases on q, k, v, o.
The Mamba-2 mixer is HF's ``Mamba2Mixer`` computation (gated RMSNorm per group, eps ``rms_norm_eps``).

Tensors: the Mamba-2 changes are those of ``chimera.models.hf.mamba2`` (``in_proj = [z, x, B, C,
dt]`` split, B/C group order, ``conv1d`` split, ``norm.weight`` -> ``norm_weight``). transformers fuses
the experts in memory (``experts.gate_up_proj``) but Granite's disk names are the original ones,
``block_sparse_moe.input_linear.weight [E, 2I, d]`` (gate rows, then up rows),
``block_sparse_moe.output_linear.weight [E, d, I]`` and ``block_sparse_moe.router.layer.weight [E, d]``;
the shared MLP is ``shared_mlp.input_linear.weight [2S, d]`` (gate, then up) and
``shared_mlp.output_linear.weight [d, S]``. The mapping works on the disk names.

Not supported (a one-line error): Mamba projection biases, a Mamba conv without bias, a
``time_step_limit`` other than ``(0, inf)``, an activation other than SiLU, RoPE scaling, a head size
other than ``hidden_size / num_attention_heads``. ``router_aux_loss_coef`` is carried over as
``moe_aux_loss_coef``; it only trains, and the two losses are normalised differently (see
``chimera.models.hf.jamba``).
"""

from __future__ import annotations

from chimera.errors import UserError
from chimera.models.hf import mamba2
from chimera.models.hf.rope import rope_from_hf, rope_to_hf
from chimera.models.hf.table import Concat, Entry, embeddings, prefixed, rename

MODEL_TYPE = "granitemoehybrid"
MIXERS = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*"}
HF_MIXERS = {"M": "mamba", "*": "attention"}  # the names of released config.json files; transformers 5 remaps them


def _rope(hf: dict) -> dict:
    if hf.get("position_embedding_type") != "rope":
        return {"rope_fraction": 0.0}
    return {"rope_fraction": 1.0, **rope_from_hf(hf)}


def config_from_hf(hf: dict) -> dict:
    unsupported = {k: hf[k] for k in ("mamba_proj_bias",) if hf.get(k)}
    if not hf.get("mamba_conv_bias", True):
        unsupported["mamba_conv_bias"] = False
    if hf.get("hidden_act", "silu") != "silu":
        unsupported["hidden_act"] = hf["hidden_act"]
    limit = mamba2.time_step_limit(hf)
    if limit[0] > 0 or limit[1] != float("inf"):
        unsupported["time_step_limit"] = limit
    d, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    if hf.get("head_dim") not in (None, d // heads):
        unsupported["head_dim"] = hf["head_dim"]
    if not isinstance(hf.get("mamba_expand", 2), int):
        unsupported["mamba_expand"] = hf["mamba_expand"]
    if unsupported:
        raise UserError(f"this Granite-4.0-H variant is not supported yet: {unsupported}")
    if d % heads:
        raise UserError(f"num_attention_heads={heads} must divide hidden_size={d}")
    layers = hf.get("num_hidden_layers", 32)
    types = hf.get("layer_types") or hf.get("layers_block_type") or ["mamba"] * layers
    bad = sorted(set(types) - set(MIXERS))
    if bad or len(types) != layers:
        raise UserError(f"Granite layer_types must be {layers} of {sorted(MIXERS)}, got {types}")
    experts = hf.get("num_local_experts", 8) or 0
    expand = hf.get("mamba_expand", 2)
    n_heads = hf.get("mamba_n_heads", 128)
    d_head = hf.get("mamba_d_head", "auto")
    d_head = expand * d // n_heads if d_head == "auto" else d_head
    if n_heads * d_head != expand * d:
        raise UserError(f"mamba_n_heads x mamba_d_head = {n_heads * d_head} must equal mamba_expand x hidden_size "
                        f"= {expand * d}")
    ffn = "E" if experts > 0 else "-"
    out = {
        "name": "granite",
        "family": MODEL_TYPE,
        "pattern": "".join(MIXERS[t] + ffn for t in types),
        "vocab_size": hf.get("vocab_size", 32000),
        "d_model": d,
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        **_rope(hf),
        "attention_scale": float(hf.get("attention_multiplier", 1.0)),
        "attention_bias": bool(hf.get("attention_bias", False)),
        "mlp_activation": "silu",
        "ssm_state": hf.get("mamba_d_state", 256),
        "ssm_expand": expand,
        "ssm_head_dim": d_head,
        "ssm_groups": hf.get("mamba_n_groups", 1),
        "ssm_chunk": hf.get("mamba_chunk_size", 256),
        "conv_kernel": hf.get("mamba_d_conv", 4),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "embedding_multiplier": float(hf.get("embedding_multiplier", 1.0)),
        "residual_multiplier": float(hf.get("residual_multiplier", 1.0)),
        "logits_divisor": float(hf.get("logits_scaling", 1.0)),
    }
    shared = hf.get("shared_intermediate_size", 1024)
    if experts > 0:
        out.update({"moe_experts": experts, "moe_top_k": hf.get("num_experts_per_tok", 2),
                    "moe_hidden": hf.get("intermediate_size", 11008), "moe_shared_hidden": shared,
                    "moe_normalize_top_k": True, "moe_capacity_factor": None,
                    "moe_aux_loss_coef": hf.get("router_aux_loss_coef", 0.001) or 0.0, "moe_z_loss_coef": 0.0})
    else:
        out["mlp_hidden"] = shared
    return out


def _check(cfg) -> None:
    layers = cfg.layers
    mixers, ffns = layers[0::2], layers[1::2]
    if len(layers) % 2 or set(mixers) - set("M*") or len(set(ffns)) != 1 or set(ffns) - set("E-"):
        raise UserError(f"a Granite-4.0-H model alternates a mixer ('M' or '*') and one kind of feed-forward "
                        f"('E' everywhere or '-' everywhere), not {layers!r}")
    problems = []
    if "*" in mixers:
        if cfg.rope_fraction not in (0.0, 1.0):
            problems.append(f"rope_fraction={cfg.rope_fraction} (Granite rotates all of a head or nothing)")
        if cfg.sublayer("*").head_dim * cfg.num_heads != cfg.d_model:
            problems.append(f"head_dim={cfg.sublayer('*').head_dim} (Granite's is d_model / num_heads)")
    if cfg.mlp_activation != "silu":
        problems.append(f"mlp_activation={cfg.mlp_activation!r} (Granite's is silu)")
    if "E" in ffns:
        if cfg.moe_shared_hidden is None:
            problems.append("moe_shared_hidden unset (every Granite MoE has a shared MLP)")
        if not cfg.moe_normalize_top_k:
            problems.append("moe_normalize_top_k=false (Granite renormalises the top-k weights)")
        if cfg.moe_capacity_factor is not None:
            problems.append(f"moe_capacity_factor={cfg.moe_capacity_factor} (Granite is dropless)")
    for field, default in (("scale_embeddings", False), ("norm_offset", False), ("logits_soft_cap", None),
                           ("linear_bias", False), ("shared_blocks", [])):
        if getattr(cfg, field) != default:
            problems.append(f"{field}={getattr(cfg, field)!r}")
    if problems:
        raise UserError(f"model {cfg.name!r} cannot be a Granite-4.0-H model: {'; '.join(problems)}")


def config_to_hf(cfg) -> dict:
    _check(cfg)
    mixers, moe = cfg.layers[0::2], cfg.layers[1] == "E"
    rope = "*" in mixers and cfg.rope_fraction == 1.0
    return {
        "architectures": ["GraniteMoeHybridForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.sublayer("E").moe_hidden if moe else cfg.mlp_hidden,
        "shared_intermediate_size": cfg.moe_shared_hidden if moe else cfg.mlp_hidden,
        "num_hidden_layers": len(mixers),
        "layer_types": [HF_MIXERS[c] for c in mixers],
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "attention_bias": cfg.attention_bias,
        "attention_multiplier": cfg.attention_scale or cfg.sublayer("*").head_dim ** -0.5,
        "position_embedding_type": "rope" if rope else "nope",
        **rope_to_hf(cfg),
        "embedding_multiplier": cfg.embedding_multiplier,
        "residual_multiplier": cfg.residual_multiplier,
        "logits_scaling": cfg.logits_divisor,
        "num_local_experts": cfg.moe_experts if moe else 0,
        "num_experts_per_tok": cfg.moe_top_k if moe else 0,
        "router_aux_loss_coef": cfg.moe_aux_loss_coef,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "mamba_n_heads": cfg.ssm_expand * cfg.d_model // cfg.ssm_head_dim,
        "mamba_d_head": cfg.ssm_head_dim,
        "mamba_n_groups": cfg.ssm_groups,
        "mamba_d_state": cfg.ssm_state,
        "mamba_d_conv": cfg.conv_kernel,
        "mamba_expand": cfg.ssm_expand,
        "mamba_chunk_size": cfg.ssm_chunk,
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
        "torch_dtype": "float32",
    }


def table(cfg) -> list[Entry]:
    _check(cfg)
    rows = embeddings(cfg, "model.embed_tokens.weight") + [rename("final_norm.weight", "model.norm.weight")]
    parts = ("weight", "bias") if cfg.attention_bias else ("weight",)
    for i in range(len(cfg.layers) // 2):
        hf, mix, ffn = f"model.layers.{i}.", f"layers.{2 * i}.", f"layers.{2 * i + 1}."
        rows += [rename(mix + "norm.weight", hf + "input_layernorm.weight"),
                 rename(ffn + "norm.weight", hf + "post_attention_layernorm.weight")]
        if cfg.layers[2 * i] == "*":
            rows += prefixed(mix + "mixer.", hf + "self_attn.", [f"{p}_proj.{w}" for p in "qkvo" for w in parts])
        else:
            rows += mamba2.mixer_table(cfg, mix + "mixer.", hf + "mamba.")
        moe = cfg.layers[2 * i + 1] == "E"
        mlp = ffn + ("mixer.shared_expert." if moe else "mixer.")  # the shared MLP: our shared expert, or the MLP
        rows += [Entry((mlp + "gate.weight", mlp + "up.weight"), (hf + "shared_mlp.input_linear.weight",), Concat(0)),
                 rename(mlp + "down.weight", hf + "shared_mlp.output_linear.weight")]
        if moe:  # experts stacked on disk: input_linear [E, 2I, d] (gate rows, then up rows), output_linear [E, d, I]
            sparse = hf + "block_sparse_moe."
            rows += [rename(ffn + "mixer.router.weight", sparse + "router.layer.weight"),
                     Entry((ffn + "mixer.gate_weight", ffn + "mixer.up_weight"), (sparse + "input_linear.weight",),
                           Concat(1)),
                     rename(ffn + "mixer.down_weight", sparse + "output_linear.weight")]
    return rows
