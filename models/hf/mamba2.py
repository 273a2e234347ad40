"""transformers ``Mamba2ForCausalLM`` <-> Chimera's ``M`` pattern (Mamba-2 SSD sublayers, no MLP).

HF fuses the input projections as ``in_proj = [z, x, B, C, dt]`` and convolves ``[x, B, C]`` with
one ``conv1d``; Chimera keeps them apart (``in_proj_z``, ``in_proj_x``, ``in_proj_bc``,
``in_proj_dt``; ``conv_x``, ``conv_bc``) so tensor parallelism splits each cleanly. B and C are
stored group-major here (``[G, (B, C), N]``, a contiguous split is a split by group) and
``[B (G, N), C (G, N)]`` in HF. The gated norm's weight is ``mixer.norm.weight`` there and
``mixer.norm_weight`` here. The LM head is tied to the embedding.
"""

from __future__ import annotations

from chimera.errors import UserError
from chimera.models.hf import mamba
from chimera.models.hf.table import Chain, Concat, Entry, Regroup, Same, Unsqueeze, prefixed, rename

MODEL_TYPE = "mamba2"


def config_from_hf(hf: dict) -> dict:
    if hf.get("use_bias") or not hf.get("use_conv_bias", True) or not hf.get("tie_word_embeddings", True):
        raise UserError("this Mamba-2 variant (biases, no conv bias, or an untied head) is not supported yet")
    limit = time_step_limit(hf)
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


def time_step_limit(hf: dict) -> list[float]:
    """A Mamba-2 config's ``time_step_limit`` (default ``(0, inf)``: no clamp). transformers writes infinities in
    config.json as ``{"__float__": "Infinity"}``."""
    def number(v) -> float:
        return float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else float(v)

    return [number(v) for v in hf.get("time_step_limit") or (0.0, float("inf"))]


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
        **mamba.backbone_config_to_hf(cfg),
    }


def mixer_dims(cfg) -> tuple[int, int, int, int]:
    """``(d_inner, groups, d_state, heads)`` of a config's Mamba-2 mixers."""
    inner = cfg.ssm_expand * cfg.d_model
    return inner, cfg.ssm_groups, cfg.ssm_state, inner // cfg.ssm_head_dim


# One HF Mamba-2 mixer (HF ``Mamba2Mixer`` and the copies of it in Granite-4.0-H and Zamba2) <-> ours, under the
# mixers' name prefixes (e.g. ``layers.3.mixer.`` and ``backbone.layers.3.mixer.``).
MIXER_SAME = ("dt_bias", "A_log", "D", "out_proj.weight")


def mixer_table(cfg, ours: str, hf: str) -> list[Entry]:
    _, g, n, _ = mixer_dims(cfg)
    bc = Regroup((g, 2, n), (1, 0, 2))  # ours [G, (B, C), N] <-> HF [B (G, N), C (G, N)]
    rows = prefixed(ours, hf, MIXER_SAME)
    rows.append(Entry(tuple(f"{ours}in_proj_{p}.weight" for p in ("z", "x", "bc", "dt")), (hf + "in_proj.weight",),
                      Concat(0, (Same(), Same(), bc, Same()))))
    rows.append(Entry((ours + "conv_x.weight", ours + "conv_bc.weight"), (hf + "conv1d.weight",),
                      Chain(Concat(0, (Same(), bc)), Unsqueeze(1))))
    rows.append(Entry((ours + "conv_x.bias", ours + "conv_bc.bias"), (hf + "conv1d.bias",), Concat(0, (Same(), bc))))
    rows.append(rename(ours + "norm_weight", hf + "norm.weight"))
    return rows


def table(cfg) -> list[Entry]:
    mamba.check_backbone(cfg, "M", "Mamba-2")
    return mamba.backbone_table(cfg, mixer_table)
