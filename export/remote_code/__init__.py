"""``--format hf`` for any Chimera model: a transformers directory with its own code (``trust_remote_code=True``).

``write`` puts into the output directory

* ``config.json``: ``model_type: chimera``, an ``auto_map`` naming the two code files for ``AutoConfig`` and
  ``AutoModelForCausalLM``, the whole Chimera model config under ``chimera``, the vocabulary size and the
  separator token (the tokenizer's end-of-text id, also used as begin and pad);
* ``generation_config.json``: those token ids (greedy by default);
* ``model.safetensors``: every parameter as ``model.`` + its Chimera name, in the chosen dtype;
* ``configuration_chimera.py`` and ``modeling_chimera.py``: this package's files of those names, copied as they
  are. They are Chimera's own code: the model class builds ``chimera.models``' model, so loading the export needs
  the ``chimera`` package installed (``chimera.models`` imports neither DeepSpeed nor Megatron), and ``generate()``
  decodes with each mixer's recurrent state as its cache (see ``modeling_chimera``);
* ``README.md``: how to load it.

The exporter (``chimera.export.exporter``) adds the tokenizer files. Nothing here imports transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from chimera.data.tokenizers import get_tokenizer
from chimera.export.source import ExportSource

CODE_FILES = ("configuration_chimera.py", "modeling_chimera.py")
WEIGHTS_FILE = "model.safetensors"
PREFIX = "model."  # ChimeraForCausalLM holds Chimera's model as .model
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

README = """# {name}: a Chimera model for transformers

Exported by `chimera export --format hf` from `{checkpoint}` (step {step}). The model code is Chimera's own
(`configuration_chimera.py`, `modeling_chimera.py`); it builds the model with the installed `chimera` package,
so `pip install chimera` first, then

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("path/to/this/directory", trust_remote_code=True)
tokens = model.generate(input_ids, max_new_tokens=20, do_sample=False)
```

`generate()` keeps each mixer's recurrent decoding state as its cache (the prompt in one pass, then one token at a
time). Prompts go unpadded (an attention mask of ones); beam search is not supported.
"""


def refusal(source: ExportSource) -> None:
    """None: every Chimera model can be expressed, since the exported code is Chimera's own."""
    return None


def hf_config(source: ExportSource, dtype: torch.dtype) -> dict:
    """``config.json``: what ``ChimeraConfig`` reads, with the ``auto_map`` that lets transformers find it."""
    cfg = source.model_cfg
    separator = get_tokenizer(source.tokenizer).eos_id
    return {
        "model_type": "chimera",
        "architectures": ["ChimeraForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_chimera.ChimeraConfig",
                     "AutoModelForCausalLM": "modeling_chimera.ChimeraForCausalLM"},
        "chimera": cfg.model_dump(mode="json"),
        "vocab_size": cfg.vocab_size,
        "bos_token_id": separator,  # documents are separated by the end-of-text token: it also begins one
        "eos_token_id": separator,
        "pad_token_id": separator,
        "cache_length": source.run.data.seq_len,  # the training context, when forward makes its own cache
        "tie_word_embeddings": False,  # a tied Chimera model simply has no head
        "use_cache": True,
        "dtype": DTYPE_NAMES[dtype],
        "chimera_checkpoint_step": source.step,
    }


def write(source: ExportSource, out_dir: Path, dtype: torch.dtype) -> None:
    """Write the transformers directory of ``source`` into the empty directory ``out_dir``."""
    out_dir = Path(out_dir)
    config = hf_config(source, dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out_dir / "generation_config.json").write_text(json.dumps({**generation, "do_sample": False}, indent=2) + "\n")
    weights = {PREFIX + name: t.detach().to(dtype).contiguous() for name, t in source.state.items()}
    save_file(weights, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    here = Path(__file__).parent
    for name in CODE_FILES:
        shutil.copyfile(here / name, out_dir / name)
    (out_dir / "README.md").write_text(README.format(name=source.model_cfg.name, checkpoint=source.checkpoint,
                                                     step=source.step))
