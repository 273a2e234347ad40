"""``--format hf``: a directory ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

Native where transformers has the architecture (the mappings of ``chimera.models.hf``: the HF name table applied
to the weights, ``config.json`` written by the mapping and read back to check it describes the same model); for
any other model a transformers package of its own (``chimera.export.remote_code``: ``configuration_*.py`` and
``modeling_*.py``, loaded with ``trust_remote_code=True``) when that module is installed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from chimera.errors import UserError
from chimera.export.safetensors_format import DEFAULT_MAX_SHARD_BYTES, write_shards
from chimera.models.hf import ARCHITECTURES, export_state

TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def native_mapping(source):
    """The ``chimera.models.hf`` mapping of the model's family, or None when transformers has no such class."""
    return ARCHITECTURES.get(source.model_cfg.family)


def _remote_code():
    if importlib.util.find_spec("chimera.export.remote_code") is None:
        return None
    return importlib.import_module("chimera.export.remote_code")


def refusal(source) -> str | None:
    from chimera.trainer.interchange import check_expressible

    mapping = native_mapping(source)
    if mapping is None:
        remote = _remote_code()
        if remote is None:
            cfg = source.model_cfg
            return (f"model {cfg.name!r} (family {cfg.family!r}) has no native transformers architecture; "
                    f"natively exportable families: {', '.join(sorted(ARCHITECTURES))} (or use --format safetensors)")
        return remote.refusal(source)
    try:
        check_expressible(mapping, source.model_cfg)
    except UserError as e:
        return str(e)
    return None


def write(source, out_dir: Path, dtype: torch.dtype, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Native: the weights under HF's names (sharded by ``max_shard_bytes``) and ``config.json``; otherwise the
    remote-code package's files (its own layout)."""
    mapping = native_mapping(source)
    if mapping is None:
        _remote_code().write(source, out_dir, dtype)
        return
    cfg = source.model_cfg
    tensors = {name: t.to(dtype) for name, t in export_state(mapping, source.state, cfg).items()}
    write_shards(tensors, out_dir, max_shard_bytes)
    config = mapping.config_to_hf(cfg)
    config["torch_dtype"] = config["dtype"] = TORCH_DTYPE_NAMES[dtype]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
