"""Chimera checkpoints <-> transformers checkpoint directories (``chimera import-hf`` / ``chimera export``).

The per-architecture name tables live beside the models, in ``chimera.models.hf``;
this module does the file work: an imported model becomes a run directory whose checkpoint holds
weights only (``chimera train`` continues from it with a fresh optimizer); the export is
``chimera.export.hf`` (through ``chimera.export.exporter``).
"""

from __future__ import annotations

import json
from pathlib import Path

from chimera.configs.loader import validated
from chimera.configs.schema import ModelConfig
from chimera.errors import UserError
from chimera.models.hf import import_state, mapping_for, read_hf_config, read_hf_tensors
from chimera.trainer.checkpoint import write_weights_checkpoint


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
    tokenizer_file = hf_tokenizer(hf_dir, cfg)
    return write_weights_checkpoint(out, cfg, state, source=source, tokenizer_file=tokenizer_file)


def hf_tokenizer(hf_dir: Path, cfg: ModelConfig) -> Path | None:
    """The directory's ``tokenizer.json`` (None when it has none), refused when its vocabulary (with the
    end-of-document token training adds) is larger than the model's embedding."""
    from chimera.data.tokenizers import HFTokenizer

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        return None
    vocab = HFTokenizer(path).vocab_size
    if vocab > cfg.vocab_size:
        raise UserError(f"{path} has {vocab} tokens but the model's vocab_size is {cfg.vocab_size}; a token past "
                        "the embedding cannot be read: pass the tokenizer this model was trained with")
    return path


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
    """A Chimera checkpoint -> safetensors + config.json that ``AutoModelForCausalLM`` loads natively
    (``chimera.export``'s ``hf`` format)."""
    from chimera.export.exporter import export

    return export(checkpoint, "hf", out)
