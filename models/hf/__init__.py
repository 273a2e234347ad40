"""Interchange with Hugging Face transformers checkpoints.

Each supported architecture has a module here (``llama.py``, ...) holding its mapping - the names on
disk are a contract, so they live beside the model they describe. A mapping provides exactly::

    MODEL_TYPE                     transformers' ``model_type``
    config_from_hf(hf) -> dict     ModelConfig fields from an HF config.json mapping
    config_to_hf(cfg) -> dict      the HF config.json of a ModelConfig (UserError if it cannot be one)
    table(cfg) -> list[Entry]      the one name table, Chimera names <-> HF names with per-tensor transforms
                                   (``chimera.models.hf.table``); HF shapes, the inverse direction and the
                                   names a file may hold beyond the required ones all follow from it

and may share public helpers of another mapping (``mamba.mixer_table``), never its private ones. Every
module here that declares a ``MODEL_TYPE`` is a mapping (``ARCHITECTURES``).
``import_state`` / ``export_state`` apply a table; ``read_hf_config`` / ``read_hf_tensors`` read a
checkpoint directory (safetensors, single or sharded); ``chimera.trainer.interchange`` turns them into
Chimera checkpoints and back.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

import torch

from chimera.errors import UserError
from chimera.models.hf import table


def _mappings() -> dict:
    """Every module of this package that declares a ``MODEL_TYPE``: adding a mapping is adding its file."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "MODEL_TYPE"):
            found[module.MODEL_TYPE] = module
    return found


ARCHITECTURES = _mappings()


def mapping_for(model_type: str):
    if model_type not in ARCHITECTURES:
        raise UserError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def read_hf_config(hf_dir: Path) -> dict:
    """The config.json mapping of a transformers checkpoint directory."""
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{hf_dir} has no config.json; pass a transformers checkpoint directory")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file} is not valid JSON ({e.msg})") from None
    return hf


def read_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers checkpoint directory (safetensors, single file or sharded)."""
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{hf_dir} has no model.safetensors (or index); only safetensors checkpoints are read")
    tensors = {}
    for name in files:
        if not (hf_dir / name).is_file():
            raise UserError(f"{hf_dir / name} is listed in the index but missing")
        try:
            tensors.update(load_file(str(hf_dir / name)))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise UserError(f"{hf_dir / name} cannot be read as safetensors ({e})") from None
    return tensors


def expected_shapes(cfg) -> dict[str, torch.Size]:
    """Full parameter shapes of a Chimera model, computed on the meta device (no process group)."""
    from chimera.models.causal_lm import meta_model

    return meta_model(cfg).full_shapes()


def hf_shapes(mapping, cfg) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the mapping knows for ``cfg``, with its shape."""
    return table.hf_shapes(mapping.table(cfg), expected_shapes(cfg))


def import_state(mapping, tensors: dict[str, torch.Tensor], cfg, where: str) -> dict[str, torch.Tensor]:
    """HF tensors -> Chimera's full state dict (fp32), names and shapes checked against the mapping's table."""
    ours = expected_shapes(cfg)
    state = table.to_ours(mapping.table(cfg), tensors, ours, where)
    table.check_shapes(state, ours, f"{where} (mapped)")
    return {k: v.float() for k, v in state.items()}


def export_state(mapping, state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Chimera's full state dict -> the HF tensors of ``AutoModelForCausalLM``'s own save."""
    return table.to_hf(mapping.table(cfg), state)
