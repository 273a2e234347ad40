"""transformers ``Zamba2ForCausalLM`` (Zamba2-1.2B/2.7B/7B) <-> Chimera's ``M`` sublayers fed by shared blocks.

Zamba2 (arXiv 2411.15242) is Zamba (see ``chimera.models.hf.zamba`` for the layers and the
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

from chimera.errors import UserError
from chimera.models.hf import mamba2, zamba
from chimera.models.hf.rope import rope_from_hf, rope_to_hf
from chimera.models.hf.table import Concat, Entry, prefixed, rename

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
    return {
        "name": "zamba2",
        **zamba.hybrid_config(hf, zamba.hf_layer_types(hf, _default_types(hf)), MIXER, blocks),
        "ssm_state": hf.get("mamba_d_state", 64),
        "rope_fraction": 1.0 if hf.get("use_mem_rope") else 0.0,
        **rope_from_hf(hf),
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
    if cfg.sublayer("M").ssm_norm_eps != GATED_NORM_EPS:
        problems.append(f"ssm_norm_eps={cfg.ssm_norm_eps} (Zamba2's gated norm uses {GATED_NORM_EPS})")
    head_dim = cfg.sublayer("*").head_dim
    widths = {cfg.num_heads * head_dim, cfg.num_kv_heads * head_dim}
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
            **rope_to_hf(cfg),
            "n_mamba_heads": inner // cfg.ssm_head_dim, "mamba_ngroups": cfg.ssm_groups, "chunk_size": cfg.ssm_chunk,
            "time_step_min": cfg.ssm_dt_min, "use_conv_bias": True, "add_bias_linear": False}


def _block_table(cfg, ours: str, hf: str) -> list:
    """The shared block: Zamba's names, with the MLP's gate and up fused as ``gate_up_proj``."""
    rows = prefixed(ours, hf, {**zamba.BLOCK_NAMES, "feed_forward.down_proj.weight": "mlp.down.weight"})
    rows.append(Entry((ours + "mlp.gate.weight", ours + "mlp.up.weight"), (hf + "feed_forward.gate_up_proj.weight",),
                      Concat(0)))
    return rows


def _adapter_table(cfg, use: str, hf: str, j: int) -> list:
    """Use ``j``'s adapters, stored with its block: (A, B) pairs ``{0,1}.weight``; the MLP's B is our gate and up
    rows stacked."""
    rows = [rename(use + "adapters.mlp.a", f"{hf}feed_forward.gate_up_proj_adapter_list.{j}.0.weight"),
            Entry((use + "adapters.mlp.b.0", use + "adapters.mlp.b.1"),
                  (f"{hf}feed_forward.gate_up_proj_adapter_list.{j}.1.weight",), Concat(0))]
    if cfg.shared_lora_attention:
        for p in "qkv":
            pair = f"{hf}self_attn.linear_{p}_adapter_list.{j}."
            rows += [rename(f"{use}adapters.attention.{p}.a", pair + "0.weight"),
                     rename(f"{use}adapters.attention.{p}.b.0", pair + "1.weight")]
    return rows


def table(cfg) -> list:
    _check(cfg)
    return zamba.hybrid_table(cfg, BLOCK, _block_table, mamba2.mixer_table, _adapter_table)
