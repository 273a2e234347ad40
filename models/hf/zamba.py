"""transformers ``ZambaForCausalLM`` (Zamba-7B) <-> Chimera's ``m`` sublayers fed by a shared block ``0``.

Zamba (Glorioso et al., arXiv 2405.16712) is a Mamba-1 backbone; at the "hybrid" layers the shared
attention+MLP block runs on ``concat(h, embeddings)`` and, through the layer's own linear, feeds
that layer's Mamba input (``chimera.models.shared_transformer``). HF layer ``i`` is Chimera layer ``i``::

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
(``ssm_heads``). Layouts: HF's ``in_proj`` interleaves the SSM input and the gate row by row
(``view(d_inner, 2, d)``: row ``2c`` is channel ``c`` of x, ``2c + 1`` of z); its per-head
``dt_proj_weight [H, P, r]``, ``dt_proj_bias``/``D [H, P]`` and ``A_log [H, P, N]`` are ours flattened
over ``(H, P)``; ``x_proj_weight [H, r + 2N, P]`` is ours as is (one head: our ``x_proj.weight``).
"""

from __future__ import annotations

import math

import torch

from chimera.errors import UserError

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
    if cfg.attention_scale != (cfg.head_size / 2) ** -0.5:
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
        "attention_head_dim": cfg.head_size,
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


def common_pairs(cfg, block_key: str, block_names: dict) -> list[tuple[str, str]]:
    """(HF name, Chimera name) of the tensors renamed only: embeddings, norms, per-use linears, shared blocks
    (each under its first use's prefix)."""
    pairs = {"model.embed_tokens.weight": "embed.weight", "model.final_layernorm.weight": "final_norm.weight"}
    if not cfg.tie_embeddings:
        pairs["lm_head.weight"] = "head.weight"
    for hf, ours, sub_hf, sub_ours, block, _, shared_hf in layer_prefixes(cfg, block_key):
        pairs[sub_hf + "input_layernorm.weight"] = sub_ours + "norm.weight"
        if block is not None:
            pairs[hf + "linear.weight"] = ours + "linear"
            pairs.update({shared_hf + k: f"shared.{block}.{v}" for k, v in block_names.items()})
    return list(pairs.items())


def common_hf_shapes(cfg, block_key: str, mlp_shapes: dict, mamba_shapes: dict) -> dict:
    """The HF shapes of what ``common_pairs`` names, plus each layer's Mamba (``mamba_shapes``) and each shared
    block's MLP (``mlp_shapes``)."""
    d = cfg.d_model
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.final_layernorm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    block = {**block_shapes(cfg), **mlp_shapes}
    for hf, _, sub_hf, _, block_index, _, shared_hf in layer_prefixes(cfg, block_key):
        shapes[sub_hf + "input_layernorm.weight"] = (d,)
        shapes.update({f"{sub_hf}mamba.{k}": v for k, v in mamba_shapes.items()})
        if block_index is not None:
            shapes[hf + "linear.weight"] = (d, d)
            shapes.update({shared_hf + k: v for k, v in block.items()})
    return shapes


def block_shapes(cfg) -> dict:
    d, q, kv = cfg.d_model, cfg.num_heads * cfg.head_size, cfg.num_kv_heads * cfg.head_size
    return {"input_layernorm.weight": (2 * d,), "pre_ff_layernorm.weight": (d,), "self_attn.q_proj.weight": (q, 2 * d),
            "self_attn.k_proj.weight": (kv, 2 * d), "self_attn.v_proj.weight": (kv, 2 * d),
            "self_attn.o_proj.weight": (d, q)}


def copy_prefixes(cfg, block_key: str) -> list[tuple[str, str]]:
    """(prefix of a later use's copy of a shared block, prefix of the block's first use) per later use."""
    first: dict[int, str] = {}
    pairs = []
    for i, block in enumerate(uses_of(cfg)):
        if block is not None:
            prefix = f"model.layers.{i}.{block_key}."
            if block in first:
                pairs.append((prefix, first[block]))
            first.setdefault(block, prefix)
    return pairs


def tied_copy_names(shapes: dict, cfg, block_key: str) -> frozenset:
    """Names a file may hold for the copies of the shared blocks at later uses, given the HF shapes (which
    hold each block once, at its first use). transformers 5 writes them when the head is untied."""
    return frozenset(copy + name.removeprefix(first) for copy, first in copy_prefixes(cfg, block_key)
                     for name in shapes if name.startswith(first))


def check_and_drop_copies(t: dict, cfg, block_key: str) -> dict:
    """Copies of a shared block must equal it (Chimera shares it); the copies are then dropped. A use's own
    adapters (``adapter_list``) are not compared: each use reads its own (``zamba2``)."""
    copies = copy_prefixes(cfg, block_key)
    for copy, first in copies:
        for name in (k for k in t if k.startswith(copy) and "adapter_list" not in k):
            original = t.get(first + name.removeprefix(copy))
            if original is not None and not torch.equal(original, t[name]):
                raise UserError(f"{name} differs from {first + name.removeprefix(copy)}: this checkpoint's shared "
                                f"blocks are not shared (transformers leaves Zamba's blocks untied when "
                                f"tie_word_embeddings is false), and Chimera's are")
    return {k: v for k, v in t.items() if not k.startswith(tuple(copy for copy, _ in copies))}


def write_copies(out: dict, cfg, block_key: str) -> dict:
    """With an untied head, transformers 5 ties nothing, so each hybrid layer loads its own copy of its
    shared block: write one per use (with a tied head transformers shares the first and wants no copies)."""
    if not cfg.tie_embeddings:
        for copy, first in copy_prefixes(cfg, block_key):
            out.update({copy + k.removeprefix(first): v.clone()  # safetensors stores no shared memory
                        for k, v in list(out.items()) if k.startswith(first)})
    return out


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
            "n_mamba_heads": cfg.ssm_heads, "mamba_dt_rank": cfg.ssm_dt_rank or math.ceil(cfg.d_model / 16),
            "mamba_conv_bias": True, "mamba_proj_bias": False, "hidden_mamba_act": "silu"}


MLP_NAMES = {f"feed_forward.{p}_proj.weight": f"mlp.{p}.weight" for p in ("gate", "up", "down")}


def _mixer_shapes(cfg) -> dict:
    inner, h, n, k = cfg.ssm_expand * cfg.d_model, cfg.ssm_heads, cfg.ssm_state, cfg.conv_kernel
    p, r = inner // h, cfg.ssm_dt_rank or -(-cfg.d_model // 16)
    return {"A_log": (h, p, n), "D": (h, p), "conv1d.weight": (inner, 1, k), "conv1d.bias": (inner,),
            "in_proj.weight": (2 * inner, cfg.d_model), "x_proj_weight": (h, r + 2 * n, p),
            "dt_proj_weight": (h, p, r), "dt_proj_bias": (h, p), "out_proj.weight": (cfg.d_model, inner)}


def hf_shapes(cfg) -> dict:
    _check(cfg)
    d, m = cfg.d_model, cfg.mlp_hidden
    mlp = {"feed_forward.gate_proj.weight": (m, d), "feed_forward.up_proj.weight": (m, d),
           "feed_forward.down_proj.weight": (d, m)}
    return common_hf_shapes(cfg, "shared_transf", mlp, _mixer_shapes(cfg))


def optional_names(cfg) -> frozenset:
    return tied_copy_names(hf_shapes(cfg), cfg, "shared_transf")


def _mixer_to_chimera(t: dict, hf: str, ours: str, cfg) -> dict:
    inner = cfg.ssm_expand * cfg.d_model
    x_and_z = t[hf + "in_proj.weight"].unflatten(0, (inner, 2))  # rows interleaved: x_c, z_c
    out = {ours + "in_proj_x.weight": x_and_z[:, 0], ours + "in_proj_z.weight": x_and_z[:, 1],
           ours + "conv1d.weight": t[hf + "conv1d.weight"][:, 0], ours + "conv1d.bias": t[hf + "conv1d.bias"],
           ours + "out_proj.weight": t[hf + "out_proj.weight"],
           ours + "dt_proj.weight": t[hf + "dt_proj_weight"].flatten(0, 1),
           ours + "dt_proj.bias": t[hf + "dt_proj_bias"].flatten(), ours + "A_log": t[hf + "A_log"].flatten(0, 1),
           ours + "D": t[hf + "D"].flatten()}
    if cfg.ssm_heads == 1:
        out[ours + "x_proj.weight"] = t[hf + "x_proj_weight"][0]
    else:
        out[ours + "x_proj_weight"] = t[hf + "x_proj_weight"]
    return out


def _mixer_to_hf(s: dict, hf: str, ours: str, cfg) -> dict:
    h = cfg.ssm_heads
    heads = lambda x: x.unflatten(0, (h, -1))  # noqa: E731  [H P, ...] -> [H, P, ...]
    x_proj = s[ours + "x_proj.weight"][None] if h == 1 else s[ours + "x_proj_weight"]
    return {hf + "in_proj.weight": torch.stack([s[ours + "in_proj_x.weight"], s[ours + "in_proj_z.weight"]],
                                               dim=1).flatten(0, 1),
            hf + "conv1d.weight": s[ours + "conv1d.weight"].unsqueeze(1), hf + "conv1d.bias": s[ours + "conv1d.bias"],
            hf + "out_proj.weight": s[ours + "out_proj.weight"], hf + "x_proj_weight": x_proj,
            hf + "dt_proj_weight": heads(s[ours + "dt_proj.weight"]),
            hf + "dt_proj_bias": heads(s[ours + "dt_proj.bias"]), hf + "A_log": heads(s[ours + "A_log"]),
            hf + "D": heads(s[ours + "D"])}


def _pairs(cfg) -> list[tuple[str, str]]:
    _check(cfg)
    return common_pairs(cfg, "shared_transf", BLOCK_NAMES | MLP_NAMES)


def to_chimera(t: dict, cfg) -> dict:
    t = check_and_drop_copies(t, cfg, "shared_transf")
    out = {ours: t[hf] for hf, ours in _pairs(cfg)}
    for _, _, sub_hf, sub_ours, *_ in layer_prefixes(cfg, "shared_transf"):
        out.update(_mixer_to_chimera(t, sub_hf + "mamba.", sub_ours + "mixer.", cfg))
    return out


def to_hf(s: dict, cfg) -> dict:
    out = {hf: s[ours] for hf, ours in _pairs(cfg)}
    for _, _, sub_hf, sub_ours, *_ in layer_prefixes(cfg, "shared_transf"):
        out.update(_mixer_to_hf(s, sub_hf + "mamba.", sub_ours + "mixer.", cfg))
    return write_copies(out, cfg, "shared_transf")
