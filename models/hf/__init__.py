"""Interchange with Hugging Face transformers checkpoints.

Each supported architecture has a module here (``llama.py``, ...) holding its name and layout
mapping - the names on disk are a contract, so they live beside the model they describe. A module
provides::

    MODEL_TYPE                     transformers' ``model_type``
    config_from_hf(hf) -> dict     ModelConfig fields from an HF config.json mapping
    config_to_hf(cfg) -> dict      the HF config.json of a ModelConfig
    to_chimera(tensors, cfg)       HF state dict -> Chimera full state dict
    to_hf(state, cfg)              Chimera full state dict -> HF state dict
    optional_names(cfg)            (optional) names a file may hold beyond hf_shapes, which import ignores

``read_hf_dir`` reads a checkpoint directory (safetensors, single or sharded) and ``check_shapes``
holds tensors to a config; ``chimera.trainer.interchange`` turns them into Chimera checkpoints and back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from chimera.errors import UserError
from chimera.models.hf import granitemoehybrid, jamba, llama, mamba, mamba2, recurrent_gemma, zamba, zamba2

ARCHITECTURES = {m.MODEL_TYPE: m for m in (llama, mamba, mamba2, recurrent_gemma, jamba, granitemoehybrid, zamba,
                                           zamba2)}


def _mapping_for_type(model_type: str):
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


def mapping_for(model_type: str):
    return _mapping_for_type(model_type)


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], where: str,
                 optional: frozenset = frozenset()) -> None:
    """Names and shapes must match exactly; ``optional`` names may be present without being expected."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - optional)
    if missing or unexpected:
        raise UserError(f"{where}: tensors do not match the config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise UserError(f"{where}: {name} has shape {tuple(state[name].shape)} but the config implies "
                            f"{tuple(shape)}")


def expected_shapes(cfg) -> dict[str, torch.Size]:
    """Full parameter shapes of a Chimera model, computed on the meta device."""
    from chimera.models.causal_lm import CausalLM
    from chimera.parallel import topology
    from chimera.parallel.sharding import full_shape

    topology.initialize(1, 1)
    with torch.device("meta"):
        model = CausalLM(cfg)
    return {n: full_shape(p, 1) for n, p in model.named_parameters()}
