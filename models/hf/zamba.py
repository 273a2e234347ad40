"""transformers ``ZambaForCausalLM`` (Zamba-7B) <-> Chimera's ``m`` sublayers fed by a shared block ``0``.

Zamba (Glorioso et al., arXiv 2405.16712) is a Mamba-1 backbone; at the "hybrid" layers the shared
attention+MLP block runs on ``concat(h, embeddings)`` and, through the layer's own linear, feeds
that layer's Mamba input (``chimera.models.shared.zamba``). HF layer ``i`` is Chimera layer ``i``::

    "mamba" / "linear_attention"  ->  "m"      model.layers.i.{input_layernorm, mamba}
    "hybrid"                      ->  "0m"     model.layers.i.{linear, mamba_decoder.{input_layernorm, mamba},
                                                               shared_transf}

so a Zamba config becomes one explicit pattern (``shared_block_style: zamba``, ``shared_blocks: ['*-']``).
transformers ties every hybrid layer's ``shared_transf`` to the first one and writes only that one to
disk: the shared block's tensors are ``model.layers.{first hybrid}.shared_transf.*``. (transformers 5
ties them only when the head is tied too; with an untied head it writes, and reads, one copy per
hybrid layer. Import requires such copies to be equal; export writes them.)

Numerics carried over: the attention has no positional encoding (``rope_fraction: 0``), its scale is
``(head_dim / 2)^-1/2`` (``attention_scale``; head_dim is ``attention_head_dim``, by default
``2 hidden / heads``), the MLP gate is exact GeLU, the Mamba has ``n_mamba_heads`` heads
(``ssm_heads``). Tensors: HF's ``in_proj`` interleaves the SSM input and the gate row by row
(``view(d_inner, 2, d)``: row ``2c`` is channel ``c`` of x, ``2c + 1`` of z); its per-head
``dt_proj_weight [H, P, r]``, ``dt_proj_bias``/``D [H, P]`` and ``A_log [H, P, N]`` are ours flattened
over ``(H, P)``; ``x_proj_weight [H, r + 2N, P]`` is ours as is (one head: our ``x_proj.weight``).
"""

from __future__ import annotations

import math

from chimera.errors import UserError
from chimera.models.hf.table import Entry, Interleave, Unsqueeze, View, copies, embeddings, prefixed, rename

MODEL_TYPE = "zamba"
MIXER = "m"
PLAIN_TYPES, HYBRID = ("mamba", "linear_attention"), "hybrid"
BLOCK_NAMES = {"input_layernorm.weight": "input_norm.weight", "pre_ff_layernorm.weight": "mlp_norm.weight",
               **{f"self_attn.{p}_proj.weight": f"attention.{p}_proj.weight" for p in "qkvo"}}


# ---- shared by Zamba and Zamba2 ----------------------------------------------------------------

def hf_layer_types(hf: dict, default: list[str]) -> list[bool]:
    """One flag per HF layer: is it a hybrid (shared block + Mamba) layer?"""
    types = hf.get("layers_block_type") or hf.get("layer_types") or default
    bad = sorted(set(types) - set(PLAIN_TYPES) - {HYBRID})
    if bad or len(types) != hf.get("num_hidden_layers", len(types)):
        raise UserError(f"{hf.get('model_type')} layers_block_type must list num_hidden_layers of "
                        f"{[*PLAIN_TYPES, HYBRID]}, got {types}")
    return [t == HYBRID for t in types]


def pattern_from_hybrid(hybrid: list[bool], mixer: str, blocks: int) -> str:
    """Use ``j`` of the shared blocks (the ``j``-th hybrid layer) runs block ``j % blocks``."""
    uses = iter(range(len(hybrid)))
    return "".join(f"{next(uses) % blocks}{mixer}" if h else mixer for h in hybrid)


def uses_of(cfg) -> list[int | None]:
    """Per HF layer: the shared block its use runs, or None for a plain layer."""
    out, symbols = [], iter(cfg.layers)
    for symbol in symbols:
        out.append(int(symbol) if symbol in "01" else None)
        if symbol in "01":
            next(symbols)
    return out


def check_hybrid(cfg, family: str, mixer: str, max_blocks: int) -> list[str]:
    """What keeps ``cfg`` from being a Zamba-family model (empty: nothing)."""
    problems = []
    if cfg.shared_block_style != "zamba" or not 1 <= len(cfg.shared_blocks) <= max_blocks:
        problems.append(f"shared_block_style={cfg.shared_block_style!r} with {len(cfg.shared_blocks)} shared blocks "
                        f"({family}: 'zamba' with up to {max_blocks})")
    uses = uses_of(cfg)
    plain = "".join(c for c in cfg.layers if c not in "01")
    if set(plain) != {mixer}:
        problems.append(f"pattern {cfg.pattern!r} ({family}: '{mixer}' sublayers, some fed by a shared block)")
    used = [u for u in uses if u is not None]
    if used != [j % max(len(cfg.shared_blocks), 1) for j in range(len(used))]:
        problems.append(f"shared blocks used in the order {used} ({family} cycles through them: 0, 1, 0, ...)")
    if cfg.mlp_activation != "gelu":
        problems.append(f"mlp_activation={cfg.mlp_activation!r} ({family}'s is gelu)")
    if cfg.attention_scale != (cfg.sublayer("*").head_dim / 2) ** -0.5:
        problems.append(f"attention_scale={cfg.attention_scale} ({family}'s is (head_dim / 2)^-0.5)")
    for field, default in (("scale_embeddings", False), ("norm_offset", False), ("logits_soft_cap", None),
                           ("linear_bias", False), ("attention_bias", False), ("residual_multiplier", 1.0),
                           ("embedding_multiplier", 1.0), ("logits_divisor", 1.0)):
        if getattr(cfg, field) != default:
            problems.append(f"{field}={getattr(cfg, field)!r}")
    return problems


def hybrid_config(hf: dict, hybrid: list[bool], mixer: str, blocks: int) -> dict:
    """The ModelConfig fields common to Zamba and Zamba2."""
    d, heads = hf["hidden_size"], hf.get("num_attention_heads", 16)
    if hf.get("attention_hidden_size", 2 * d) != 2 * d:
        raise UserError(f"attention_hidden_size={hf['attention_hidden_size']} (Chimera's Zamba block reads "
                        f"concat(h, embeddings): 2 x hidden_size = {2 * d})")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise UserError(f"{hf.get('model_type')} with hidden_act={hf['hidden_act']!r} is not supported yet (gelu)")
    head_dim = hf.get("attention_head_dim") or 2 * d // heads
    return {
        "family": hf.get("model_type"),
        "pattern": pattern_from_hybrid(hybrid, mixer, blocks),
        "vocab_size": hf.get("vocab_size", 32000),
        "d_model": d,
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": head_dim,
        "attention_scale": (head_dim / 2) ** -0.5,
        "shared_blocks": ["*-"] * blocks,
        "shared_block_style": "zamba",
        "mlp_hidden": hf.get("intermediate_size") or 4 * d,
        "mlp_activation": "gelu",
        "ssm_state": hf.get("mamba_d_state", 16),
        "ssm_expand": hf.get("mamba_expand", 2),
        "conv_kernel": hf.get("mamba_d_conv", 4),
        "norm_eps": hf.get("rms_norm_eps", 1e-5),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
    }


def hybrid_config_to_hf(cfg) -> dict:
    uses = uses_of(cfg)
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "attention_hidden_size": 2 * cfg.d_model,
        "attention_head_dim": cfg.sublayer("*").head_dim,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.mlp_hidden,
        "hidden_act": "gelu",
        "num_hidden_layers": len(uses),
        "layers_block_type": ["mamba" if u is None else HYBRID for u in uses],
        "mamba_d_state": cfg.ssm_state,
        "mamba_d_conv": cfg.conv_kernel,
        "mamba_expand": cfg.ssm_expand,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
    }


def layer_prefixes(cfg, block_key: str):
    """Per HF layer ``i``: (its HF prefix, ours, its Mamba sublayer's HF prefix, ours, the shared block it uses or
    None, the use's index among all uses, the HF prefix the block is stored under: that of its first use)."""
    first_use: dict[int, int] = {}
    j = 0
    for i, block in enumerate(uses_of(cfg)):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        if block is None:
            yield hf, ours, hf, ours, None, None, None
        else:
            first_use.setdefault(block, i)
            shared_hf = f"model.layers.{first_use[block]}.{block_key}."
            yield hf, ours, hf + "mamba_decoder.", ours + "sublayer.", block, j, shared_hf
            j += 1


COPY_NOTE = " (transformers leaves Zamba's blocks untied when tie_word_embeddings is false)"


def hybrid_table(cfg, block_key: str, block_table, mixer_table, adapter_table=None) -> list:
    """The rows of Zamba and Zamba2: embeddings, norms, each layer's Mamba (``mixer_table``), each use's linear
    and each shared block (``block_table(cfg, ours, hf)``) under its first use's prefix, plus the block's copies
    at its later uses: written with an untied head (transformers then ties nothing and each hybrid layer loads
    its own), and on import, equal to the block or refused. ``adapter_table(cfg, use_ours, hf, j)``: a use's
    own adapters, stored with the block (``...adapter_list.{j}``); in a later use's copy of the block, the
    copy's own use's adapters are the ones transformers reads (``preferred``), the others' are ignored."""
    rows = embeddings(cfg, "model.embed_tokens.weight") + [
        rename("final_norm.weight", "model.final_layernorm.weight")]
    block_rows: dict[int, list] = {}  # each block's own tensors, under its first use's prefix (first[block])
    first: dict[int, str] = {}
    adapter_rows: dict[int, dict[int, list]] = {}  # each block's uses' adapters there, by use index
    later_uses: list[tuple[int, int, str]] = []  # (block, use index, prefix of the use's copy of the block)
    for hf, ours, sub_hf, sub_ours, block, j, shared_hf in layer_prefixes(cfg, block_key):
        rows.append(rename(sub_ours + "norm.weight", sub_hf + "input_layernorm.weight"))
        rows += mixer_table(cfg, sub_ours + "mixer.", sub_hf + "mamba.")
        if block is None:
            continue
        rows.append(rename(ours + "linear", hf + "linear.weight"))
        if block not in block_rows:
            block_rows[block], first[block] = block_table(cfg, f"shared.{block}.", shared_hf), shared_hf
        else:
            later_uses.append((block, j, hf + block_key + "."))
        adapter_rows.setdefault(block, {})[j] = [] if adapter_table is None else adapter_table(cfg, ours, shared_hf, j)
    for block in sorted(block_rows):
        rows += block_rows[block] + [r for use in adapter_rows[block].values() for r in use]
    untied = not cfg.tie_embeddings
    for block, j, copy in later_uses:
        rows += copies(block_rows[block], first[block], copy, export=untied, on_import="checked", note=COPY_NOTE)
        for use, use_rows in adapter_rows[block].items():  # transformers reads a use's adapters in its own copy
            rows += copies(use_rows, first[block], copy, export=untied,
                           on_import="preferred" if use == j else "ignored")
    return rows


# ---- Zamba ------------------------------------------------------------------------------------

def _default_types(hf: dict) -> list[str]:
    """transformers' ZambaConfig default: two Mamba layers, a hybrid, then hybrids where i % period == offset."""
    period, offset, n = hf.get("attn_layer_period", 6), hf.get("attn_layer_offset", 4), hf.get("num_hidden_layers", 76)
    return ["mamba", "mamba", HYBRID] + [HYBRID if i % period == offset else "mamba" for i in range(n - 3)]


def config_from_hf(hf: dict) -> dict:
    unsupported = {k: hf[k] for k in ("mamba_proj_bias",) if hf.get(k)}
    if not hf.get("mamba_conv_bias", True):
        unsupported["mamba_conv_bias"] = False
    if hf.get("hidden_mamba_act", "silu") != "silu":
        unsupported["hidden_mamba_act"] = hf["hidden_mamba_act"]
    if unsupported:
        raise UserError(f"this Zamba variant is not supported yet: {unsupported}")
    d, dt_rank = hf["hidden_size"], hf.get("mamba_dt_rank", "auto")
    heads = hf.get("n_mamba_heads", 2)
    if (hf.get("mamba_expand", 2) * d) % heads:
        raise UserError(f"n_mamba_heads={heads} must divide mamba_expand x hidden_size")
    return {
        "name": "zamba",
        **hybrid_config(hf, hf_layer_types(hf, _default_types(hf)), MIXER, blocks=1),
        "rope_fraction": 0.0,  # Zamba's attention has no positional encoding
        "ssm_heads": heads,
        "ssm_dt_rank": math.ceil(d / 16) if dt_rank == "auto" else dt_rank,
    }


def _check(cfg) -> None:
    problems = check_hybrid(cfg, "Zamba", MIXER, max_blocks=1)
    if cfg.rope_fraction != 0:
        problems.append(f"rope_fraction={cfg.rope_fraction} (Zamba's attention has no RoPE: 0)")
    if cfg.shared_lora_rank or cfg.ssm_dt_bc_norm:
        problems.append("shared LoRA adapters or dt/B/C norms (Zamba has neither)")
    if problems:
        raise UserError(f"model {cfg.name!r} cannot be a Zamba model: {'; '.join(problems)}")


def config_to_hf(cfg) -> dict:
    _check(cfg)
    return {"architectures": ["ZambaForCausalLM"], "model_type": MODEL_TYPE, **hybrid_config_to_hf(cfg),
            "n_mamba_heads": cfg.ssm_heads, "mamba_dt_rank": cfg.sublayer("m").ssm_dt_rank,
            "mamba_conv_bias": True, "mamba_proj_bias": False, "hidden_mamba_act": "silu"}


MLP_NAMES = {f"feed_forward.{p}_proj.weight": f"mlp.{p}.weight" for p in ("gate", "up", "down")}


def _block_table(cfg, ours: str, hf: str) -> list:
    return prefixed(ours, hf, BLOCK_NAMES | MLP_NAMES)


def _mixer_table(cfg, ours: str, hf: str) -> list:
    """Zamba's multi-head Mamba: ``in_proj`` interleaves x and z rows; per-head tensors are ours over ``(H, P)``."""
    inner, h, n = cfg.ssm_expand * cfg.d_model, cfg.ssm_heads, cfg.ssm_state
    p, r = inner // h, cfg.sublayer("m").ssm_dt_rank
    rows = prefixed(ours, hf, ("conv1d.bias", "out_proj.weight"))
    rows += [Entry((ours + "in_proj_x.weight", ours + "in_proj_z.weight"), (hf + "in_proj.weight",), Interleave(0)),
             rename(ours + "conv1d.weight", hf + "conv1d.weight", Unsqueeze(1)),
             rename(ours + "dt_proj.weight", hf + "dt_proj_weight", View((h, p, r))),
             rename(ours + "dt_proj.bias", hf + "dt_proj_bias", View((h, p))),
             rename(ours + "A_log", hf + "A_log", View((h, p, n))),
             rename(ours + "D", hf + "D", View((h, p)))]
    if h == 1:  # one head: our x_proj is a row-parallel linear, HF's a [1, r + 2N, P] stack
        rows.append(rename(ours + "x_proj.weight", hf + "x_proj_weight", Unsqueeze(0)))
    else:
        rows.append(rename(ours + "x_proj_weight", hf + "x_proj_weight"))
    return rows


def table(cfg) -> list:
    _check(cfg)
    return hybrid_table(cfg, "shared_transf", _block_table, _mixer_table)
