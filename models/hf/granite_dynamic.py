"""IBM Granite-4.0-H (transformers ``GraniteMoeHybridForCausalLM``) -> the routed hybrid ('Y', DynamicHybridModel).

Granite layer ``i``'s mixer becomes a routed hybrid block whose path of Granite's type holds Granite's mixer,
tensor for tensor (``chimera.models.hf.granitemoehybrid``'s table, renamed under ``mixer.ssm.`` or
``mixer.attention.``); the other path, the router's weight and the bridges start as a fresh model's (bridges 0).
The router's bias marks Granite's assignment::

    b_r = [+margin, -margin]   Granite layer "mamba"      b_r = [-margin, +margin]   "attention"

and the converted run has ``routed_forced: true``: every token takes ``argmax b_r``, at probability 1, so the
converted model computes exactly Granite's function. Training with routing on is ``--set
model.routed_forced=false``: the router then starts with Granite's assignment as its prior (``softmax(b_r)``),
the capacities of the run apply and the bridges learn from 0. Feed-forwards, norms, embeddings and Granite's muP
multipliers are carried over unchanged. A converted model has no transformers counterpart (no ``family``).
"""

from __future__ import annotations

import re

import torch

from chimera.errors import UserError
from chimera.models.hf import granitemoehybrid

INTO = "dynamic-hybrid"
ROUTER_MARGIN = 2.0  # b_r's prior for Granite's own path: softmax gives it 0.98 once routing is on
PATH_OF = {"M": "ssm", "*": "attention"}


def convert(hf: dict, granite_cfg, granite_state: dict[str, torch.Tensor], where: str):
    """An imported Granite model (its config.json, Chimera config and full state) -> the routed hybrid's."""
    from chimera.configs.loader import validated
    from chimera.models.causal_lm import build_model
    from chimera.models.config import ModelConfig
    from chimera.parallel.dims import ParallelDims

    if hf.get("model_type") != granitemoehybrid.MODEL_TYPE:
        raise UserError(f"--into {INTO} converts Granite-4.0-H ({granitemoehybrid.MODEL_TYPE}) checkpoints; "
                        f"{where} is {hf.get('model_type')!r}")
    layers = granite_cfg.layers
    fields = granite_cfg.model_dump(exclude_unset=True)
    fields.update(name=INTO, family=None, pattern="".join("Y" if c in PATH_OF else c for c in layers),
                  num_layers=None, routed_forced=True)
    cfg = validated(ModelConfig, fields, prefix=f"{where} -> model.")
    fresh = {k: v.float() for k, v in build_model(cfg, ParallelDims(), seed=0).state_dict().items()}
    return cfg, state_from_granite(granite_state, layers, fresh)


def state_from_granite(granite_state: dict[str, torch.Tensor], granite_layers: str,
                       fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Granite's full state dict (Chimera's names for a Granite model) over a fresh routed-hybrid state dict."""
    state = dict(fresh)
    for name, tensor in granite_state.items():
        m = re.match(r"layers\.(\d+)\.mixer\.(.*)", name)
        if m and granite_layers[int(m.group(1))] in PATH_OF:
            name = f"layers.{m.group(1)}.mixer.{PATH_OF[granite_layers[int(m.group(1))]]}.{m.group(2)}"
        if name not in state or state[name].shape != tensor.shape:
            raise KeyError(f"{name}: no such tensor in the routed hybrid of this shape")
        state[name] = tensor
    for i, kind in enumerate(granite_layers):
        if kind in PATH_OF:
            sign = 1.0 if kind == "M" else -1.0
            state[f"layers.{i}.mixer.router.bias"] = torch.tensor([sign, -sign]) * ROUTER_MARGIN
    return state
