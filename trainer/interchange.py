"""Chimera checkpoints <-> transformers checkpoint directories (``chimera import-hf`` / ``chimera export``).

The per-architecture name tables live beside the models, in ``chimera.models.hf``;
this module does the file work: an imported model becomes a run directory whose checkpoint holds
weights only (``chimera train`` continues from it with a fresh optimizer), and an export writes
``model.safetensors`` + ``config.json`` atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from chimera.configs.loader import validated
from chimera.configs.schema import ModelConfig
from chimera.errors import UserError
from chimera.models.hf import ARCHITECTURES, export_state, import_state, mapping_for, read_hf_config, read_hf_tensors
from chimera.trainer.checkpoint import read_config, read_weights, resolve_checkpoint, verify, write_weights_checkpoint


def import_hf(hf_dir: str | Path, out: str | Path, into: str | None = None) -> Path:
    """A transformers checkpoint directory -> a Chimera run directory holding a weights-only checkpoint; ``into``
    converts the model on the way (``dynamic-hybrid``: Granite-4.0-H -> ``chimera.models.hf.granite_dynamic``)."""
    hf_dir, out = Path(hf_dir), Path(out)
    if not hf_dir.is_dir():
        raise UserError(f"{str(hf_dir)!r} is not a directory")
    if out.exists():
        raise UserError(f"--out {str(out)!r} already exists; choose a new directory")
    hf = read_hf_config(hf_dir)
    mapping = mapping_for(hf.get("model_type", "?"))
    tensors = read_hf_tensors(hf_dir)
    cfg = validated(ModelConfig, mapping.config_from_hf(hf), prefix=f"{hf_dir / 'config.json'} -> model.")
    state = import_state(mapping, tensors, cfg, str(hf_dir))
    source = f"transformers {hf['model_type']} from {hf_dir}"
    if into is not None:
        from chimera.models.hf import granite_dynamic

        cfg, state = granite_dynamic.convert(hf, cfg, state, str(hf_dir))
        source += f", converted into {into}"
    return write_weights_checkpoint(out, cfg, state, source=source)


# Fields that do not change a model's output (training settings, names, how it is computed; the layers are
# compared as the expanded pattern).
OUTPUT_NEUTRAL_FIELDS = {"name", "preset", "family", "init_std", "moe_aux_loss_coef", "moe_z_loss_coef", "ssm_chunk",
                         "pattern", "num_layers"}


def check_expressible(mapping, cfg: ModelConfig) -> None:
    """The HF config written for ``cfg`` must describe the same model: read it back and compare.

    A Chimera model may use settings its HF architecture cannot hold (say a residual multiplier in a
    Llama); exporting it would silently change the function, so it is refused, naming the fields."""
    back = validated(ModelConfig, mapping.config_from_hf(json.loads(json.dumps(mapping.config_to_hf(cfg)))))
    differ = [k for k in ModelConfig.model_fields if k not in OUTPUT_NEUTRAL_FIELDS
              and back.effective(k) != cfg.effective(k) and cfg.uses(k)]
    if back.layers != cfg.layers:
        differ.insert(0, "layers")
    if differ:
        raise UserError(f"a {mapping.MODEL_TYPE} checkpoint cannot express this model's "
                        f"{', '.join(differ)}; export refused (it would change what the model computes)")


def export_hf(checkpoint: str | Path, out: str | Path) -> Path:
    """A Chimera checkpoint -> safetensors + config.json that ``AutoModelForCausalLM`` loads natively."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists():
        raise UserError(f"--out {str(out)!r} already exists; choose a new directory")
    ckpt = resolve_checkpoint(checkpoint)
    verify(ckpt)
    cfg = read_config(ckpt).model
    if cfg.family not in ARCHITECTURES:
        raise UserError(f"model {cfg.name!r} (family {cfg.family!r}) has no transformers counterpart; "
                        f"exportable families: {', '.join(sorted(ARCHITECTURES))}")
    mapping = ARCHITECTURES[cfg.family]
    check_expressible(mapping, cfg)
    state = read_weights(ckpt)
    tensors = export_state(mapping, state, cfg)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(mapping.config_to_hf(cfg), indent=2))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
