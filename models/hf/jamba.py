"""transformers ``JambaForCausalLM`` <-> Chimera's hybrid of ``m``/``*`` mixers and ``-``/``E`` feed-forwards.

Jamba (Lieber et al., arXiv 2403.19887) layer ``i`` is Chimera sublayers ``2i`` (``input_layernorm`` +
the mixer) and ``2i + 1`` (``pre_ff_layernorm`` + the feed-forward)::

    mixer i = attention ("*")  if i % attn_layer_period == attn_layer_offset    else Mamba ("m")
    ffn i   = MoE ("E")        if num_experts > 1 and
                                  i % expert_layer_period == expert_layer_offset else gated MLP ("-")

so a Jamba config becomes one explicit pattern (``num_layers`` unset). Numerics that differ from
Chimera's defaults: the Mamba mixer normalises dt, B and C (``ssm_dt_bc_norm``), attention has no
positional encoding at all (``rope_fraction: 0``), the MoE router takes softmax then top-k without
renormalising (``moe_normalize_top_k: false``), SiLU gates, and the head is not tied (v0.1).

Tensors: the Mamba mixer maps as in ``chimera.models.hf.mamba`` (``in_proj`` split, ``conv1d`` squeezed),
with the dt/B/C norms. transformers fuses the experts in memory
(``experts.gate_up_proj``, ``experts.down_proj``) but reads and writes them per expert on disk
(``feed_forward.experts.{j}.{gate,up,down}_proj.weight``, 2-D); the mapping works on the disk names
and stacks them into our ``gate_weight``/``up_weight [E, hidden, d]`` and ``down_weight [E, d, hidden]``.

The router's load-balancing loss only trains; ``router_aux_loss_coef`` is carried over as
``moe_aux_loss_coef`` as is, although the two losses are normalised differently (HF's counts sum to
``top_k`` and it pools all MoE layers into one term; ours is per layer, counts summing to 1).
"""

from __future__ import annotations

import math

from chimera.errors import UserError
from chimera.models.hf import mamba
from chimera.models.hf.table import Entry, Unstack, embeddings, prefixed, rename

MODEL_TYPE = "jamba"


def _pattern(hf: dict) -> str:
    layers, experts = hf.get("num_hidden_layers", 32), hf.get("num_experts", 16)
    attn = (hf.get("attn_layer_period", 8), hf.get("attn_layer_offset", 4))
    moe = (hf.get("expert_layer_period", 2), hf.get("expert_layer_offset", 1))
    for what, (period, offset) in (("attn_layer", attn), ("expert_layer", moe)):
        if not 0 <= offset < period:
            raise UserError(f"Jamba {what}_offset={offset} must lie in [0, {what}_period={period})")
    return "".join(("*" if i % attn[0] == attn[1] else "m") + ("E" if experts > 1 and i % moe[0] == moe[1] else "-")
                   for i in range(layers))


def config_from_hf(hf: dict) -> dict:
    unsupported = {k: hf.get(k) for k in ("mamba_proj_bias",) if hf.get(k)}
    if not hf.get("mamba_conv_bias", True):
        unsupported["mamba_conv_bias"] = False
    if hf.get("hidden_act", "silu") != "silu":
        unsupported["hidden_act"] = hf["hidden_act"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
        unsupported["head_dim"] = hf["head_dim"]
    if unsupported:
        raise UserError(f"this Jamba variant is not supported yet: {unsupported}")
    if hf["hidden_size"] % hf["num_attention_heads"]:
        raise UserError(f"num_attention_heads={hf['num_attention_heads']} must divide hidden_size={hf['hidden_size']}")
    experts = hf.get("num_experts", 16)
    dt_rank = hf.get("mamba_dt_rank", "auto")
    return {
        "name": "jamba",
        "family": MODEL_TYPE,
        "pattern": _pattern(hf),
        "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"],
        "num_heads": hf["num_attention_heads"],
        "num_kv_heads": hf.get("num_key_value_heads", 8) or hf["num_attention_heads"],  # JambaConfig's defaults
        "rope_fraction": 0.0,  # Jamba's attention has no positional encoding
        "mlp_hidden": hf.get("intermediate_size", 14336),
        "mlp_activation": "silu",
        "moe_experts": experts,
        "moe_top_k": hf.get("num_experts_per_tok", 2) if experts > 1 else 1,
        "moe_normalize_top_k": False,
        "moe_capacity_factor": None,
        "moe_aux_loss_coef": hf.get("router_aux_loss_coef", 0.001),
        "moe_z_loss_coef": 0.0,
        "ssm_state": hf.get("mamba_d_state", 16),
        "ssm_expand": hf.get("mamba_expand", 2),
        "ssm_dt_rank": math.ceil(hf["hidden_size"] / 16) if dt_rank == "auto" else dt_rank,
        "ssm_dt_bc_norm": True,
        "conv_kernel": hf.get("mamba_d_conv", 4),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def _period(flags: list[bool]) -> tuple[int, int]:
    """The smallest (period, offset) with ``flags[i] == (i % period == offset)``; none set: past the end."""
    n = len(flags)
    for period in range(1, n + 2):
        for offset in range(period):
            if all(f == (i % period == offset) for i, f in enumerate(flags)):
                return period, offset
    raise UserError(f"the layers {''.join('x' if f else '.' for f in flags)} do not recur with a period and "
                    f"offset, which is all a Jamba config can say")


def _check(cfg) -> None:
    layers = cfg.layers
    mixers, ffns = layers[0::2], layers[1::2]
    if len(layers) % 2 or set(mixers) - set("*m") or set(ffns) - set("-E"):
        raise UserError(f"a Jamba model alternates a mixer ('*' or 'm') and a feed-forward ('-' or 'E'), "
                        f"not {layers!r}")
    problems = []
    if "*" in mixers:
        if cfg.rope_fraction != 0:
            problems.append(f"rope_fraction={cfg.rope_fraction} (Jamba's attention has no RoPE: 0)")
        if cfg.effective("head_dim") * cfg.num_heads != cfg.d_model:
            problems.append(f"head_dim={cfg.effective('head_dim')} (Jamba's is d_model / num_heads)")
    if "m" in mixers and not cfg.ssm_dt_bc_norm:
        problems.append("ssm_dt_bc_norm=false (Jamba's Mamba normalises dt, B and C)")
    if cfg.mlp_activation != "silu":
        problems.append(f"mlp_activation={cfg.mlp_activation!r} (Jamba's is silu)")
    if "E" in ffns:
        if cfg.moe_normalize_top_k:
            problems.append("moe_normalize_top_k=true (Jamba does not renormalise)")
        if cfg.moe_capacity_factor is not None:
            problems.append(f"moe_capacity_factor={cfg.moe_capacity_factor} (Jamba is dropless)")
        if cfg.effective("moe_hidden") != cfg.mlp_hidden:
            problems.append(f"moe_hidden={cfg.moe_hidden} (Jamba's experts are mlp_hidden={cfg.mlp_hidden} wide)")
    for field, default in (("scale_embeddings", False), ("norm_offset", False), ("logits_soft_cap", None),
                           ("linear_bias", False), ("shared_blocks", [])):
        if getattr(cfg, field) != default:
            problems.append(f"{field}={getattr(cfg, field)!r}")
    if problems:
        raise UserError(f"model {cfg.name!r} cannot be a Jamba model: {'; '.join(problems)}")


def config_to_hf(cfg) -> dict:
    _check(cfg)
    mixers, ffns = cfg.layers[0::2], cfg.layers[1::2]
    attn_period, attn_offset = _period([c == "*" for c in mixers])
    moe = "E" in ffns
    expert_period, expert_offset = _period([c == "E" for c in ffns]) if moe else (2, 1)
    return {
        "architectures": ["JambaForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": len(mixers),
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attn_layer_period": attn_period,
        "attn_layer_offset": attn_offset,
        "num_experts": cfg.moe_experts if moe else 1,
        "num_experts_per_tok": cfg.moe_top_k if moe else 1,
        "expert_layer_period": expert_period,
        "expert_layer_offset": expert_offset,
        "router_aux_loss_coef": cfg.moe_aux_loss_coef,
        "mamba_d_state": cfg.ssm_state,
        "mamba_d_conv": cfg.conv_kernel,
        "mamba_expand": cfg.ssm_expand,
        "mamba_dt_rank": cfg.sublayer("m").ssm_dt_rank,
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
        "torch_dtype": "float32",
    }


def table(cfg) -> list[Entry]:
    _check(cfg)
    rows = embeddings(cfg, "model.embed_tokens.weight") + [
        rename("final_norm.weight", "model.final_layernorm.weight")]
    for i in range(len(cfg.layers) // 2):
        hf, mix, ffn = f"model.layers.{i}.", f"layers.{2 * i}.", f"layers.{2 * i + 1}."
        rows += [rename(mix + "norm.weight", hf + "input_layernorm.weight"),
                 rename(ffn + "norm.weight", hf + "pre_ff_layernorm.weight")]
        if cfg.layers[2 * i] == "*":
            rows += prefixed(mix + "mixer.", hf + "self_attn.", [f"{p}_proj.weight" for p in "qkvo"])
        else:
            rows += mamba.mixer_table(cfg, mix + "mixer.", hf + "mamba.")
        if cfg.layers[2 * i + 1] == "E":  # on disk one tensor per expert: experts.{j}.{gate,up,down}_proj
            rows.append(rename(ffn + "mixer.router.weight", hf + "feed_forward.router.weight"))
            rows += [Entry((f"{ffn}mixer.{p}_weight",),
                           tuple(f"{hf}feed_forward.experts.{j}.{p}_proj.weight" for j in range(cfg.moe_experts)),
                           Unstack()) for p in ("gate", "up", "down")]
        else:
            rows += prefixed(ffn + "mixer.", hf + "feed_forward.",
                             {f"{p}_proj.weight": f"{p}.weight" for p in ("gate", "up", "down")})
    return rows
