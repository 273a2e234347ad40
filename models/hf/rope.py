"""RoPE settings between transformers' configs and Chimera's attention fields, for every mapping.

transformers 5 keeps RoPE in ``config.rope_parameters`` (``rope_theta``, ``rope_type`` and the type's scaling
fields; RecurrentGemma also ``partial_rotary_factor``); older configs have a top-level ``rope_theta`` and
``rope_scaling``. Both are read (``rope_parameters`` first); ``rope_parameters`` is written. The types Chimera
computes (``chimera.models.mixers.attention.Rope``): ``default``, ``linear`` and ``llama3``; any other is refused
with one line, never imported with other frequencies.
"""

from __future__ import annotations

from chimera.errors import UserError

SUPPORTED = ("default", "linear", "llama3")


def rope_from_hf(hf: dict, default_fraction: float | None = None) -> dict:
    """Chimera's ``rope_*`` fields of an HF config (``rope_fraction`` from ``partial_rotary_factor`` when the
    architecture has one: ``default_fraction`` is then its default)."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in SUPPORTED:
        raise UserError(f"RoPE type {kind!r} is not supported (Chimera computes {', '.join(SUPPORTED)}): "
                        f"{params}")
    out = {"rope_base": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if default_fraction is not None:
        out["rope_fraction"] = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor",
                                                                                default_fraction)))
    if kind == "linear":
        out.update(rope_scaling="linear", rope_factor=float(params["factor"]))
    elif kind == "llama3":
        out.update(rope_scaling="llama3", rope_factor=float(params["factor"]),
                   rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_positions=int(params["original_max_position_embeddings"]))
    return out


def rope_to_hf(cfg, with_fraction: bool = False) -> dict:
    """``{"rope_parameters": ...}`` of a Chimera model config."""
    params = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling, "rope_theta": cfg.rope_base}
    if cfg.rope_scaling in ("linear", "llama3"):
        params["factor"] = cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        params.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                      original_max_position_embeddings=cfg.rope_original_max_positions)
    if with_fraction:
        params["partial_rotary_factor"] = cfg.rope_fraction
    return {"rope_parameters": params}
