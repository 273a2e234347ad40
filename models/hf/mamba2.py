"""transformers ``Mamba2ForCausalLM`` <-> Chimera's ``M`` pattern (Mamba-2 SSD sublayers, no MLP).

HF fuses the input projections as ``in_proj = [z, x, B, C, dt]`` and convolves ``[x, B, C]`` with
one ``conv1d``; Chimera keeps them apart (``in_proj_z``, ``in_proj_x``, ``in_proj_bc``,
``in_proj_dt``; ``conv_x``, ``conv_bc``) so tensor parallelism splits each cleanly. B and C are
stored group-major here (``[G, (B, C), N]``, a contiguous split is a split by group) and
``[B (G, N), C (G, N)]`` in HF. The gated norm's weight is ``mixer.norm.weight`` there and
``mixer.norm_weight`` here. The LM head is tied to the embedding.
"""

from __future__ import annotations

import torch

from chimera.errors import UserError
from chimera.models.hf import mamba

MODEL_TYPE = "mamba2"


def config_from_hf(hf: dict) -> dict:
    if hf.get("use_bias") or not hf.get("use_conv_bias", True) or not hf.get("tie_word_embeddings", True):
        raise UserError("this Mamba-2 variant (biases, no conv bias, or an untied head) is not supported yet")
    limit = [_number(v) for v in hf.get("time_step_limit") or (0.0, float("inf"))]
    if limit[0] > 0 or limit[1] != float("inf"):
        raise UserError(f"Mamba-2 with time_step_limit {limit} is not supported yet")
    expand, d = hf.get("expand", 2), hf["hidden_size"]
    if hf.get("num_heads") and hf["num_heads"] * hf.get("head_dim", 64) != expand * d:
        raise UserError(f"num_heads x head_dim = {hf['num_heads'] * hf.get('head_dim', 64)} must equal "
                        f"expand x hidden_size = {expand * d}")
    return {
        "name": "mamba2",
        "family": MODEL_TYPE,
        "pattern": "M",
        "num_layers": hf["num_hidden_layers"],
        "vocab_size": hf["vocab_size"],
        "d_model": d,
        "ssm_state": hf.get("state_size", 128),
        "ssm_expand": expand,
        "ssm_head_dim": hf.get("head_dim", 64),
        "ssm_groups": hf.get("n_groups", 1),
        "ssm_chunk": hf.get("chunk_size", 256),
        "conv_kernel": hf.get("conv_kernel", 4),
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "tie_embeddings": True,
    }


def _number(v) -> float:
    """transformers writes infinities in config.json as ``{"__float__": "Infinity"}``."""
    return float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else float(v)


def config_to_hf(cfg) -> dict:
    inner = cfg.ssm_expand * cfg.d_model
    return {
        "architectures": ["Mamba2ForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "state_size": cfg.ssm_state,
        "num_hidden_layers": len(cfg.layers),
        "expand": cfg.ssm_expand,
        "head_dim": cfg.ssm_head_dim,
        "num_heads": inner // cfg.ssm_head_dim,
        "n_groups": cfg.ssm_groups,
        "chunk_size": cfg.ssm_chunk,
        "conv_kernel": cfg.conv_kernel,
        "use_bias": False,
        "use_conv_bias": True,
        "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": True,
        "residual_in_fp32": True,
        "torch_dtype": "float32",
    }


def _dims(cfg):
    if set(cfg.layers) != {"M"}:
        raise UserError(f"a Mamba-2 model has the pattern 'M' repeated, not {cfg.layers!r}")
    return mixer_dims(cfg)


def mixer_dims(cfg) -> tuple[int, int, int, int]:
    """``(d_inner, groups, d_state, heads)`` of a config's Mamba-2 mixers."""
    inner = cfg.ssm_expand * cfg.d_model
    return inner, cfg.ssm_groups, cfg.ssm_state, inner // cfg.ssm_head_dim


def _bc_to_hf(t: torch.Tensor, g: int, n: int) -> torch.Tensor:  # [G, (B, C), N, ...] -> [B (G, N), C (G, N)]
    t = t.unflatten(0, (g, 2, n))
    return torch.cat([t[:, 0].flatten(0, 1), t[:, 1].flatten(0, 1)])


def _bc_from_hf(t: torch.Tensor, g: int, n: int) -> torch.Tensor:
    b, c = t[: g * n].unflatten(0, (g, n)), t[g * n :].unflatten(0, (g, n))
    return torch.stack([b, c], dim=1).flatten(0, 2)


# One HF Mamba-2 mixer (HF ``Mamba2Mixer`` and the copies of it in Granite-4.0-H and Zamba2) <-> ours. ``hf``
# and ``ours`` are the mixers' name prefixes, e.g. ``backbone.layers.3.mixer.`` and ``layers.3.mixer.``.
MIXER_SAME = ("dt_bias", "A_log", "D", "out_proj.weight")


def mixer_hf_shapes(cfg) -> dict:
    inner, g, n, h = mixer_dims(cfg)
    d, k, conv = cfg.d_model, cfg.conv_kernel, inner + 2 * g * n
    return {"dt_bias": (h,), "A_log": (h,), "D": (h,), "conv1d.weight": (conv, 1, k), "conv1d.bias": (conv,),
            "in_proj.weight": (2 * inner + 2 * g * n + h, d), "norm.weight": (inner,), "out_proj.weight": (d, inner)}


def mixer_to_chimera(t: dict, hf: str, ours: str, cfg) -> dict:
    inner, g, n, h = mixer_dims(cfg)
    out = {ours + k: t[hf + k] for k in MIXER_SAME}
    z, x, bc, dt = t[hf + "in_proj.weight"].split([inner, inner, 2 * g * n, h])
    out.update({ours + "in_proj_z.weight": z, ours + "in_proj_x.weight": x,
                ours + "in_proj_bc.weight": _bc_from_hf(bc, g, n), ours + "in_proj_dt.weight": dt})
    for part in ("weight", "bias"):
        conv = t[f"{hf}conv1d.{part}"]
        conv = conv[:, 0] if part == "weight" else conv
        out[f"{ours}conv_x.{part}"], out[f"{ours}conv_bc.{part}"] = conv[:inner], _bc_from_hf(conv[inner:], g, n)
    out[ours + "norm_weight"] = t[hf + "norm.weight"]
    return out


def mixer_to_hf(s: dict, hf: str, ours: str, cfg) -> dict:
    _, g, n, _ = mixer_dims(cfg)
    out = {hf + k: s[ours + k] for k in MIXER_SAME}
    out[hf + "in_proj.weight"] = torch.cat([s[ours + "in_proj_z.weight"], s[ours + "in_proj_x.weight"],
                                            _bc_to_hf(s[ours + "in_proj_bc.weight"], g, n),
                                            s[ours + "in_proj_dt.weight"]])
    for part in ("weight", "bias"):
        conv = torch.cat([s[f"{ours}conv_x.{part}"], _bc_to_hf(s[f"{ours}conv_bc.{part}"], g, n)])
        out[f"{hf}conv1d.{part}"] = conv.unsqueeze(1) if part == "weight" else conv
    out[hf + "norm.weight"] = s[ours + "norm_weight"]
    return out


def hf_shapes(cfg) -> dict:
    _dims(cfg)
    return mamba.backbone_hf_shapes(cfg, mixer_hf_shapes(cfg))


def to_chimera(t: dict, cfg) -> dict:
    _dims(cfg)
    return mamba.backbone_to_chimera(t, cfg, mixer_to_chimera)


def to_hf(s: dict, cfg) -> dict:
    _dims(cfg)
    return mamba.backbone_to_hf(s, cfg, mixer_to_hf)
