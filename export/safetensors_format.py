"""``--format safetensors``: Chimera's own parameter names in safetensors shards, with the model config.

* ``model.safetensors``, or when the tensors exceed the shard size ``model-00001-of-0000N.safetensors`` ... and
  ``model.safetensors.index.json`` (transformers' layout: ``metadata.total_size`` in bytes, ``weight_map``: tensor
  name -> file);
* ``chimera_config.json``: the run config's ``model`` section (every field resolved), the step and the dtype.

Every model can be written this way; ``chimera.load_model(DIR)`` builds the model from the config and loads the
tensors (as fp32: a bf16 or fp16 export gives back its rounded weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from chimera.errors import UserError

CONFIG_FILE = "chimera_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
FORMAT_NAME = "chimera-safetensors"


def refusal(source) -> str | None:
    return None  # any model: its own parameter names, its own config


def write(source, out_dir: Path, dtype: torch.dtype, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    write_shards({name: t.to(dtype) for name, t in source.state.items()}, out_dir, max_shard_bytes)
    config = {"format": FORMAT_NAME, "step": source.step, "dtype": str(dtype).removeprefix("torch."),
              "model": source.model_cfg.model_dump(mode="json")}
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def shard_plan(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names in order, cut into shards of at most ``max_shard_bytes`` each (a tensor larger than that is a
    shard of its own)."""
    shards, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    return shards


def write_shards(tensors: dict[str, torch.Tensor], out_dir: Path,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """``tensors`` as one ``model.safetensors`` or as numbered shards with an index; returns the file names."""
    from safetensors.torch import save_file

    tensors = {name: t.contiguous() for name, t in tensors.items()}
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    shards = shard_plan(sizes, max_shard_bytes)
    if len(shards) <= 1:
        save_file(tensors, str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
        return [SINGLE_FILE]
    files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for file, names in zip(files, shards):
        save_file({n: tensors[n] for n in names}, str(out_dir / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(sizes.values())},
             "weight_map": {n: file for file, names in zip(files, shards) for n in names}}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return files


def read_shards(export_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export directory (single file or sharded)."""
    from safetensors.torch import load_file

    if (export_dir / INDEX_FILE).is_file():
        files = sorted(set(json.loads((export_dir / INDEX_FILE).read_text())["weight_map"].values()))
    else:
        files = [SINGLE_FILE]
    tensors = {}
    for file in files:
        if not (export_dir / file).is_file():
            raise UserError(f"{export_dir / file} is missing (named by the export's index); export the model again")
        tensors.update(load_file(str(export_dir / file)))
    return tensors


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def load_model(export_dir: str | Path) -> torch.nn.Module:
    """The model of a safetensors export, on one process, fp32, in eval mode."""
    from chimera.configs.schema import ModelConfig
    from chimera.models.causal_lm import meta_model
    from chimera.parallel.sharding import load_full_state_dict

    export_dir = Path(export_dir)
    config = json.loads((export_dir / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT_NAME:
        raise UserError(f"{export_dir / CONFIG_FILE} is not a Chimera safetensors export's config")
    model = meta_model(ModelConfig.model_validate(config["model"]))
    load_full_state_dict(model, {name: t.float() for name, t in read_shards(export_dir).items()})
    return model.eval()
