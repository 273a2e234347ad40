"""transformers ``Zamba2ForCausalLM`` (Zamba2-1.2B/2.7B/7B) <-> Chimera's ``M`` sublayers fed by shared blocks.

Zamba2 (arXiv 2411.15242) is Zamba (see ``chimera.models.hf.zamba`` for the layer layout and the
shared block) with a Mamba-2 backbone, ``num_mem_blocks`` shared blocks used in turn (hybrid use ``j``
runs block ``j % num_mem_blocks``: symbols ``0``, ``1``, ``0``, ...), and per-use LoRA adapters:
always on the MLP's fused ``gate_up_proj`` (rank ``adapter_rank``: ``shared_lora_rank``), and on q, k, v
with ``use_shared_attention_adapter`` (``shared_lora_attention``). RoPE on the shared attention with
``use_mem_rope`` (``rope_fraction`` 1, else 0).

On disk, block ``b`` lives under its first hybrid layer, ``model.layers.{i_b}.shared_transformer``, and
holds the adapters of all its uses: ``feed_forward.gate_up_proj_adapter_list.{j}.{0,1}.weight`` (A, B) and
``self_attn.linear_{q,k,v}_adapter_list.{j}.{0,1}.weight`` for each use ``j`` of that block. Ours are on
the use: ``layers.{i}.adapters.mlp.{a, b.0, b.1}`` (B split into its gate and up rows) and
``layers.{i}.adapters.attention.{q,k,v}.{a, b.0}``. ``gate_up_proj`` is our ``mlp.gate`` and ``mlp.up``
stacked. The Mamba-2 mixer maps as in ``chimera.models.hf.mamba2``; Zamba2 clamps dt at
``time_step_min`` (``ssm_dt_min``) and its gated norm's eps is 1e-5 (``ssm_norm_eps``).
"""

from __future__ import annotations

import torch

from chimera.errors import UserError
from chimera.models.hf import zamba
from chimera.models.hf.mamba2 import mixer_hf_shapes, mixer_to_chimera, mixer_to_hf

MODEL_TYPE = "zamba2"
MIXER = "M"
BLOCK = "shared_transformer"
GATED_NORM_EPS = 1e-5  # Zamba2RMSNormGated's, fixed in transformers


def _default_types(hf: dict) -> list[str]:
    """transformers' Zamba2Config default (Zamba2-2.7B's 54 layers)."""
    m, h = "mamba", zamba.HYBRID
    return [m] + ([m] * 5 + [h]) * 7 + [m] * 4 + [h] + [m] * 3 + [h] + [m] * 2


def config_from_hf(hf: dict) -> dict:
    unsupported = {k: hf[k] for k in ("add_bias_linear", "use_long_context") if hf.get(k)}
    if not hf.get("use_conv_bias", True):
        unsupported["use_conv_bias"] = False
    if (hf.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        unsupported["rope_parameters"] = hf["rope_parameters"]
    if unsupported:
        raise UserError(f"this Zamba2 variant is not supported yet: {unsupported}")
    blocks = hf.get("num_mem_blocks", 1)
    if blocks not in (1, 2):
        raise UserError(f"num_mem_blocks={blocks}: Chimera holds up to 2 shared blocks (symbols 0 and 1)")
    d, expand = hf["hidden_size"], hf.get("mamba_expand", 2)
    heads = hf.get("n_mamba_heads", 8)
    if (expand * d) % heads:
        raise UserError(f"n_mamba_heads={heads} must divide mamba_expand x hidden_size = {expand * d}")
    rope = hf.get("rope_parameters") or {}
    return {
        "name": "zamba2",
        **zamba.hybrid_config(hf, zamba.hf_layer_types(hf, _default_types(hf)), MIXER, blocks),
        "ssm_state": hf.get("mamba_d_state", 64),
        "rope_fraction": 1.0 if hf.get("use_mem_rope") else 0.0,
        "rope_base": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "shared_lora_rank": hf.get("adapter_rank", 128),
        "shared_lora_attention": bool(hf.get("use_shared_attention_adapter", False)),
        "ssm_head_dim": expand * d // heads,
        "ssm_groups": hf.get("mamba_ngroups", 1),
        "ssm_chunk": hf.get("chunk_size", 256),
        "ssm_dt_min": float(hf.get("time_step_min", 1e-3)),
        "ssm_norm_eps": GATED_NORM_EPS,
    }


def _check(cfg) -> None:
    problems = zamba.check_hybrid(cfg, "Zamba2", MIXER, max_blocks=2)
    if cfg.rope_fraction not in (0.0, 1.0):
        problems.append(f"rope_fraction={cfg.rope_fraction} (Zamba2 rotates all of a head or nothing)")
    if not cfg.shared_lora_rank:
        problems.append("shared_lora_rank unset (Zamba2's MLP always has per-use adapters)")
    if (cfg.ssm_norm_eps or cfg.norm_eps) != GATED_NORM_EPS:
        problems.append(f"ssm_norm_eps={cfg.ssm_norm_eps} (Zamba2's gated norm uses {GATED_NORM_EPS})")
    widths = {cfg.num_heads * cfg.head_size, cfg.num_kv_heads * cfg.head_size}
    if cfg.shared_lora_attention and widths != {2 * cfg.d_model}:
        problems.append("q/k/v adapters with (kv) heads x head_dim != 2 d_model (Zamba2's adapters are 2d wide)")
    if problems:
        raise UserError(f"model {cfg.name!r} cannot be a Zamba2 model: {'; '.join(problems)}")


def config_to_hf(cfg) -> dict:
    _check(cfg)
    inner = cfg.ssm_expand * cfg.d_model
    return {"architectures": ["Zamba2ForCausalLM"], "model_type": MODEL_TYPE, **zamba.hybrid_config_to_hf(cfg),
            "num_mem_blocks": len(cfg.shared_blocks), "adapter_rank": cfg.shared_lora_rank,
            "use_shared_attention_adapter": cfg.shared_lora_attention, "use_mem_rope": cfg.rope_fraction == 1.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
            "n_mamba_heads": inner // cfg.ssm_head_dim, "mamba_ngroups": cfg.ssm_groups, "chunk_size": cfg.ssm_chunk,
            "time_step_min": cfg.ssm_dt_min, "use_conv_bias": True, "add_bias_linear": False}


def _adapter_names(cfg, own: bool = False):
    """(HF prefix of an A/B pair, our adapter) per use and adapted projection. The pair is in the block's
    first use's ``shared_transformer``; with ``own``, in the copy at the use's own layer (untied heads)."""
    for hf, ours, _, _, block, j, shared_hf in zamba.layer_prefixes(cfg, BLOCK):
        if block is None:
            continue
        where = f"{hf}{BLOCK}." if own else shared_hf
        yield f"{where}feed_forward.gate_up_proj_adapter_list.{j}.", f"{ours}adapters.mlp."
        if cfg.shared_lora_attention:
            for p in "qkv":
                yield f"{where}self_attn.linear_{p}_adapter_list.{j}.", f"{ours}adapters.attention.{p}."


def hf_shapes(cfg) -> dict:
    _check(cfg)
    d, m, r = cfg.d_model, cfg.mlp_hidden, cfg.shared_lora_rank
    mlp = {"feed_forward.gate_up_proj.weight": (2 * m, d), "feed_forward.down_proj.weight": (d, m)}
    shapes = zamba.common_hf_shapes(cfg, BLOCK, mlp, mixer_hf_shapes(cfg))
    for hf, ours in _adapter_names(cfg):
        on_mlp = ours.endswith("mlp.")
        shapes[hf + "0.weight"] = (r, d if on_mlp else 2 * d)  # A
        shapes[hf + "1.weight"] = (2 * m if on_mlp else 2 * d, r)  # B
    return shapes


def optional_names(cfg) -> frozenset:
    return zamba.tied_copy_names(hf_shapes(cfg), cfg, BLOCK)


def _pairs(cfg) -> list[tuple[str, str]]:
    _check(cfg)
    pairs = zamba.common_pairs(cfg, BLOCK, {**zamba.BLOCK_NAMES, "feed_forward.down_proj.weight": "mlp.down.weight"})
    for hf, ours in _adapter_names(cfg):
        pairs.append((hf + "0.weight", ours + "a"))
        if not ours.endswith("mlp."):
            pairs.append((hf + "1.weight", ours + "b.0"))
    return pairs


def to_chimera(t: dict, cfg) -> dict:
    # A use's adapters: from its own layer's copy of the block when the file has one (transformers reads
    # them there when it leaves the blocks untied), else from the block's first use.
    for (first, _), (own, _) in zip(_adapter_names(cfg), _adapter_names(cfg, own=True)):
        for part in ("0.weight", "1.weight"):
            if own + part in t:
                t = {**t, first + part: t[own + part]}
    t = zamba.check_and_drop_copies(t, cfg, BLOCK)
    out = {ours: t[hf] for hf, ours in _pairs(cfg)}
    for _, _, sub_hf, sub_ours, block, _, shared_hf in zamba.layer_prefixes(cfg, BLOCK):
        out.update(mixer_to_chimera(t, sub_hf + "mamba.", sub_ours + "mixer.", cfg))
        if block is not None:
            out[f"shared.{block}.mlp.gate.weight"], out[f"shared.{block}.mlp.up.weight"] = \
                t[shared_hf + "feed_forward.gate_up_proj.weight"].chunk(2)
    for hf, ours in _adapter_names(cfg):
        if ours.endswith("mlp."):
            out[ours + "b.0"], out[ours + "b.1"] = t[hf + "1.weight"].chunk(2)
    return out


def to_hf(s: dict, cfg) -> dict:
    out = {hf: s[ours] for hf, ours in _pairs(cfg)}
    for _, _, sub_hf, sub_ours, block, _, shared_hf in zamba.layer_prefixes(cfg, BLOCK):
        out.update(mixer_to_hf(s, sub_hf + "mamba.", sub_ours + "mixer.", cfg))
        if block is not None:
            out[shared_hf + "feed_forward.gate_up_proj.weight"] = torch.cat(
                [s[f"shared.{block}.mlp.gate.weight"], s[f"shared.{block}.mlp.up.weight"]])
    for hf, ours in _adapter_names(cfg):
        if ours.endswith("mlp."):
            out[hf + "1.weight"] = torch.cat([s[ours + "b.0"], s[ours + "b.1"]])
    return zamba.write_copies(out, cfg, BLOCK)
