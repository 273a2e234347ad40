"""transformers ``MambaForCausalLM`` <-> Chimera's ``m`` pattern (Mamba-1 sublayers, no MLP).

Names follow HF's ``MambaMixer`` except two layouts: HF's ``in_proj`` is our ``in_proj_x`` and
``in_proj_z`` concatenated along the output dim, and HF's ``conv1d.weight [d_inner, 1, k]`` is ours
``[d_inner, k]``. The LM head is tied to the embedding (as in the released checkpoints).
"""

from __future__ import annotations

import torch

from chimera.errors import UserError

MODEL_TYPE = "mamba"
SAME = ("norm.weight", "mixer.A_log", "mixer.D", "mixer.conv1d.bias", "mixer.x_proj.weight", "mixer.dt_proj.weight",
        "mixer.dt_proj.bias", "mixer.out_proj.weight")


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


def hf_shapes(cfg) -> dict:
    _check(cfg)
    d, n, k = cfg.d_model, cfg.ssm_state, cfg.conv_kernel
    inner, r = cfg.ssm_expand * d, cfg.ssm_dt_rank or -(-d // 16)
    shapes = {"backbone.embeddings.weight": (cfg.vocab_size, d), "backbone.norm_f.weight": (d,)}
    per_layer = {"norm.weight": (d,), "mixer.A_log": (inner, n), "mixer.D": (inner,),
                 "mixer.conv1d.weight": (inner, 1, k), "mixer.conv1d.bias": (inner,),
                 "mixer.in_proj.weight": (2 * inner, d), "mixer.x_proj.weight": (r + 2 * n, inner),
                 "mixer.dt_proj.weight": (inner, r), "mixer.dt_proj.bias": (inner,),
                 "mixer.out_proj.weight": (d, inner)}
    for i in range(len(cfg.layers)):
        shapes.update({f"backbone.layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def to_chimera(t: dict, cfg) -> dict:
    _check(cfg)
    out = {"embed.weight": t["backbone.embeddings.weight"], "final_norm.weight": t["backbone.norm_f.weight"]}
    for i in range(len(cfg.layers)):
        hf, ours = f"backbone.layers.{i}", f"layers.{i}"
        out.update({f"{ours}.{k}": t[f"{hf}.{k}"] for k in SAME})
        out[f"{ours}.mixer.in_proj_x.weight"], out[f"{ours}.mixer.in_proj_z.weight"] = \
            t[f"{hf}.mixer.in_proj.weight"].chunk(2, dim=0)
        out[f"{ours}.mixer.conv1d.weight"] = t[f"{hf}.mixer.conv1d.weight"][:, 0]
    return out


def to_hf(s: dict, cfg) -> dict:
    _check(cfg)
    out = {"backbone.embeddings.weight": s["embed.weight"], "backbone.norm_f.weight": s["final_norm.weight"]}
    for i in range(len(cfg.layers)):
        hf, ours = f"backbone.layers.{i}", f"layers.{i}"
        out.update({f"{hf}.{k}": s[f"{ours}.{k}"] for k in SAME})
        out[f"{hf}.mixer.in_proj.weight"] = torch.cat([s[f"{ours}.mixer.in_proj_x.weight"],
                                                       s[f"{ours}.mixer.in_proj_z.weight"]])
        out[f"{hf}.mixer.conv1d.weight"] = s[f"{ours}.mixer.conv1d.weight"].unsqueeze(1)
    return out
