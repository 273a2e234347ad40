"""transformers ``MambaForCausalLM`` <-> Chimera's ``m`` pattern (Mamba-1 sublayers, no MLP).

Names follow HF's ``MambaMixer`` except two layouts: HF's ``in_proj`` is our ``in_proj_x`` and
``in_proj_z`` concatenated along the output dim, and HF's ``conv1d.weight [d_inner, 1, k]`` is ours
``[d_inner, k]``. The LM head is tied to the embedding (as in the released checkpoints).
"""

from __future__ import annotations

import torch

from chimera.errors import UserError

MODEL_TYPE = "mamba"


def config_from_hf(hf: dict) -> dict:
    if hf.get("use_bias") or not hf.get("use_conv_bias", True) or not hf.get("tie_word_embeddings", True):
        raise UserError("this Mamba variant (biases, no conv bias, or an untied head) is not supported yet")
    return {
        "name": "mamba",
        "family": MODEL_TYPE,
        "pattern": "m",
        "num_layers": hf["num_hidden_layers"],
        "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"],
        "ssm_state": hf.get("state_size", 16),
        "ssm_expand": hf.get("expand", 2),
        "ssm_dt_rank": hf.get("time_step_rank") if hf.get("time_step_rank", "auto") != "auto" else None,
        "conv_kernel": hf.get("conv_kernel", 4),
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "tie_embeddings": True,
    }


def config_to_hf(cfg) -> dict:
    return {
        "architectures": ["MambaForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "state_size": cfg.ssm_state,
        "num_hidden_layers": len(cfg.layers),
        "expand": cfg.ssm_expand,
        "conv_kernel": cfg.conv_kernel,
        "time_step_rank": cfg.ssm_dt_rank or -(-cfg.d_model // 16),
        "use_bias": False,
        "use_conv_bias": True,
        "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": True,
        "residual_in_fp32": True,
        "torch_dtype": "float32",
    }


def _check(cfg) -> None:
    if set(cfg.layers) != {"m"}:
        raise UserError(f"a Mamba model has the pattern 'm' repeated, not {cfg.layers!r}")


# One HF Mamba-1 mixer (HF ``MambaMixer`` and Jamba's, which adds the dt/B/C norms) <-> ours. ``hf`` and
# ``ours`` are the mixers' name prefixes, e.g. ``backbone.layers.3.mixer.`` and ``layers.3.mixer.``.
MIXER_SAME = ("A_log", "D", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "out_proj.weight")
SELECTION_NORMS = ("dt_layernorm.weight", "b_layernorm.weight", "c_layernorm.weight")  # ssm_dt_bc_norm (Jamba)


def _renamed(cfg) -> tuple[str, ...]:
    return MIXER_SAME + (SELECTION_NORMS if cfg.ssm_dt_bc_norm else ())


def mixer_hf_shapes(cfg) -> dict:
    d, n, k = cfg.d_model, cfg.ssm_state, cfg.conv_kernel
    inner, r = cfg.ssm_expand * d, cfg.ssm_dt_rank or -(-d // 16)
    shapes = {"A_log": (inner, n), "D": (inner,), "conv1d.weight": (inner, 1, k), "conv1d.bias": (inner,),
              "in_proj.weight": (2 * inner, d), "x_proj.weight": (r + 2 * n, inner), "dt_proj.weight": (inner, r),
              "dt_proj.bias": (inner,), "out_proj.weight": (d, inner)}
    if cfg.ssm_dt_bc_norm:
        shapes.update({"dt_layernorm.weight": (r,), "b_layernorm.weight": (n,), "c_layernorm.weight": (n,)})
    return shapes


def mixer_to_chimera(t: dict, hf: str, ours: str, cfg) -> dict:
    out = {ours + k: t[hf + k] for k in _renamed(cfg)}
    out[ours + "in_proj_x.weight"], out[ours + "in_proj_z.weight"] = t[hf + "in_proj.weight"].chunk(2, dim=0)
    out[ours + "conv1d.weight"] = t[hf + "conv1d.weight"][:, 0]
    return out


def mixer_to_hf(s: dict, hf: str, ours: str, cfg) -> dict:
    out = {hf + k: s[ours + k] for k in _renamed(cfg)}
    out[hf + "in_proj.weight"] = torch.cat([s[ours + "in_proj_x.weight"], s[ours + "in_proj_z.weight"]])
    out[hf + "conv1d.weight"] = s[ours + "conv1d.weight"].unsqueeze(1)
    return out


# The pure-SSM "backbone" layout of HF's Mamba and Mamba-2: ``backbone.{embeddings, norm_f}`` and per layer
# ``backbone.layers.{i}.{norm, mixer}``; Chimera layer ``i`` is ``layers.{i}.{norm, mixer}``. Each function takes
# the mixer's own mapping (``mixer_hf_shapes(cfg)``, ``mixer_to_chimera``, ``mixer_to_hf``).

def backbone_hf_shapes(cfg, mixer_shapes: dict) -> dict:
    d = cfg.d_model
    shapes = {"backbone.embeddings.weight": (cfg.vocab_size, d), "backbone.norm_f.weight": (d,)}
    for i in range(len(cfg.layers)):
        shapes[f"backbone.layers.{i}.norm.weight"] = (d,)
        shapes.update({f"backbone.layers.{i}.mixer.{k}": v for k, v in mixer_shapes.items()})
    return shapes


def backbone_to_chimera(t: dict, cfg, mixer_to_chimera) -> dict:
    out = {"embed.weight": t["backbone.embeddings.weight"], "final_norm.weight": t["backbone.norm_f.weight"]}
    for i in range(len(cfg.layers)):
        hf, ours = f"backbone.layers.{i}.", f"layers.{i}."
        out[ours + "norm.weight"] = t[hf + "norm.weight"]
        out.update(mixer_to_chimera(t, hf + "mixer.", ours + "mixer.", cfg))
    return out


def backbone_to_hf(s: dict, cfg, mixer_to_hf) -> dict:
    out = {"backbone.embeddings.weight": s["embed.weight"], "backbone.norm_f.weight": s["final_norm.weight"]}
    for i in range(len(cfg.layers)):
        hf, ours = f"backbone.layers.{i}.", f"layers.{i}."
        out[hf + "norm.weight"] = s[ours + "norm.weight"]
        out.update(mixer_to_hf(s, hf + "mixer.", ours + "mixer.", cfg))
    return out


def hf_shapes(cfg) -> dict:
    _check(cfg)
    return backbone_hf_shapes(cfg, mixer_hf_shapes(cfg))


def to_chimera(t: dict, cfg) -> dict:
    _check(cfg)
    return backbone_to_chimera(t, cfg, mixer_to_chimera)


def to_hf(s: dict, cfg) -> dict:
    _check(cfg)
    return backbone_to_hf(s, cfg, mixer_to_hf)
