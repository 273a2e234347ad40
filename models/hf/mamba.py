"""transformers ``MambaForCausalLM`` <-> Chimera's ``m`` pattern (Mamba-1 sublayers, no MLP).

Names follow HF's ``MambaMixer`` except two tensors: HF's ``in_proj`` is our ``in_proj_x`` and
``in_proj_z`` concatenated along the output dim, and HF's ``conv1d.weight [d_inner, 1, k]`` is ours
``[d_inner, k]``. The LM head is tied to the embedding (as in the released checkpoints).
"""

from __future__ import annotations

from chimera.errors import UserError
from chimera.models.hf.table import Concat, Entry, Unsqueeze, prefixed, rename

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
        "time_step_rank": cfg.sublayer("m").ssm_dt_rank,
        **backbone_config_to_hf(cfg),
    }


def backbone_config_to_hf(cfg) -> dict:
    """The config.json entries HF's Mamba and Mamba-2 share: no biases but the conv's, a tied head."""
    return {"use_bias": False, "use_conv_bias": True, "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": True,
            "residual_in_fp32": True, "torch_dtype": "float32"}


def check_backbone(cfg, symbol: str, family: str) -> None:
    if set(cfg.layers) != {symbol}:
        raise UserError(f"a {family} model has the pattern {symbol!r} repeated, not {cfg.layers!r}")


# One HF Mamba-1 mixer (HF ``MambaMixer`` and Jamba's, which adds the dt/B/C norms) <-> ours, under the mixers'
# name prefixes (e.g. ``layers.3.mixer.`` and ``backbone.layers.3.mixer.``).
MIXER_SAME = ("A_log", "D", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "out_proj.weight")
SELECTION_NORMS = ("dt_layernorm.weight", "b_layernorm.weight", "c_layernorm.weight")  # ssm_dt_bc_norm (Jamba)


def mixer_table(cfg, ours: str, hf: str) -> list[Entry]:
    rows = prefixed(ours, hf, MIXER_SAME + (SELECTION_NORMS if cfg.ssm_dt_bc_norm else ()))
    rows.append(Entry((ours + "in_proj_x.weight", ours + "in_proj_z.weight"), (hf + "in_proj.weight",), Concat(0)))
    rows.append(rename(ours + "conv1d.weight", hf + "conv1d.weight", Unsqueeze(1)))  # [c, k] <-> [c, 1, k]
    return rows


def backbone_table(cfg, mixer_table) -> list[Entry]:
    """The pure-SSM "backbone" naming of HF's Mamba and Mamba-2: ``backbone.{embeddings, norm_f}`` and per layer
    ``backbone.layers.{i}.{norm, mixer}`` (ours: ``layers.{i}.{norm, mixer}``), with the mixer's own table."""
    rows = [rename("embed.weight", "backbone.embeddings.weight"), rename("final_norm.weight", "backbone.norm_f.weight")]
    for i in range(len(cfg.layers)):
        hf, ours = f"backbone.layers.{i}.", f"layers.{i}."
        rows.append(rename(ours + "norm.weight", hf + "norm.weight"))
        rows += mixer_table(cfg, ours + "mixer.", hf + "mixer.")
    return rows


def table(cfg) -> list[Entry]:
    check_backbone(cfg, "m", "Mamba")
    return backbone_table(cfg, mixer_table)
