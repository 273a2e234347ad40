"""Matching parameter counts: the model width at which a preset has a target number of parameters.

Widths scaled with ``d_model``: the preset's ``mlp_hidden`` and ``rnn_width`` keep their ratio to it (rounded to a
multiple of 8). ``d_model`` moves in steps that keep every head whole: multiples of ``2 * num_heads`` (an even
head dimension, as RoPE needs) and of 8. At small widths one step changes the count by several percent, so the
MLP width is then the fine knob: with ``d_model`` fixed, ``mlp_hidden`` (a multiple of 2; the count is linear in
it) is moved to the value nearest the target. A candidate the model config refuses (a divisibility rule of some
sublayer kind) is skipped. Counts come from the model built on the meta device: no weights are allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from chimera.errors import UserError

TOLERANCE = 0.02
SCALED = ("mlp_hidden", "rnn_width")  # widths that follow d_model when the preset sets them


@dataclass
class Width:
    d_model: int
    overrides: dict  # the model fields to set (d_model and the widths derived from it)
    parameters: int
    target: int

    @property
    def error(self) -> float:
        return abs(self.parameters - self.target) / self.target


def _round(x: float, multiple: int = 8) -> int:
    return max(multiple, multiple * round(x / multiple))


def count_parameters(preset: str, overrides: dict) -> int | None:
    """The parameter count of ``preset`` with ``overrides`` (None when the config refuses them)."""
    from chimera.configs.loader import load_model_config
    from chimera.models.causal_lm import meta_model

    try:
        cfg = load_model_config(preset, [f"{k}={v}" for k, v in overrides.items()])
    except UserError:
        return None
    return meta_model(cfg).num_parameters()


def widths_at(preset: str, overrides: dict, d_model: int) -> dict:
    """The overrides that make ``preset`` (with ``overrides``) ``d_model`` wide, derived widths scaled alike."""
    from chimera.configs.loader import load_preset

    base = {**load_preset(preset), **overrides}
    out = dict(overrides, d_model=d_model)
    for key in SCALED:
        if base.get(key) and key not in overrides:
            out[key] = _round(base[key] * d_model / base["d_model"])
    return out


def width_step(preset: str, overrides: dict) -> int:
    from chimera.configs.loader import load_preset

    base = {**load_preset(preset), **overrides}
    return math.lcm(2 * int(base.get("num_heads", 1)), 8)


def solve_width(preset: str, target: int, overrides: dict | None = None, tolerance: float = TOLERANCE) -> Width:
    """The ``d_model`` (and derived widths) at which ``preset`` has the count nearest ``target``; a count further
    than ``tolerance`` from it is a ``UserError`` saying the nearest one."""
    overrides = dict(overrides or {})
    step = width_step(preset, overrides)

    def count(k: int) -> int | None:
        return count_parameters(preset, widths_at(preset, overrides, k * step))

    lo, hi = 1, 1
    while (c := count(hi)) is None or c < target:  # double until past the target
        lo, hi = hi, hi * 2
        if hi * step > 65536:
            raise UserError(f"{preset}: no width up to d_model {hi * step} reaches {target:,} parameters")
    while hi - lo > 1:  # counts grow with the width: bisect for the first at or above the target
        mid = (lo + hi) // 2
        c = count(mid)
        lo, hi = (mid, hi) if c is None or c < target else (lo, mid)
    candidates = [(k, count(k)) for k in range(max(1, lo - 1), hi + 2)]
    k, params = min(((k, c) for k, c in candidates if c is not None), key=lambda kc: abs(kc[1] - target))
    found = Width(d_model=k * step, overrides=widths_at(preset, overrides, k * step), parameters=params, target=target)
    if found.error > tolerance / 4 and "mlp_hidden" in found.overrides and "mlp_hidden" not in overrides:
        found = _fine_tune_mlp(preset, found)
    if found.error > tolerance:
        raise UserError(f"{preset}: the nearest count to {target:,} parameters is {params:,} at d_model "
                        f"{found.d_model} ({100 * found.error:.1f}% off, more than {100 * tolerance:.0f}%); change "
                        "num_layers or the target")
    return found


def _fine_tune_mlp(preset: str, found: Width) -> Width:
    """``found`` with ``mlp_hidden`` moved (a multiple of 2) to the count nearest the target, ``d_model`` kept."""
    hidden = found.overrides["mlp_hidden"]
    at = lambda h: count_parameters(preset, {**found.overrides, "mlp_hidden": h})  # noqa: E731
    base, wider = at(hidden), at(hidden + 2)
    if base is None or wider is None or wider == base:
        return found
    h = hidden + 2 * round((found.target - base) / (wider - base))
    best = found
    for candidate in (h - 2, h, h + 2):
        c = at(candidate) if candidate >= 2 else None
        if c is not None and abs(c - found.target) < abs(best.parameters - found.target):
            best = Width(found.d_model, {**found.overrides, "mlp_hidden": candidate}, c, found.target)
    return best
