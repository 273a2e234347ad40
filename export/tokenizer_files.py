"""The run's tokenizer travels with every export.

* ``chimera_tokenizer.json``: which tokenizer the model reads (``bytes``, ``dna`` or ``tokenizer.json``), with its
  identity (vocabulary size, end-of-document id, for a file its sha256), so that a reader knows the ids without
  the run directory;
* ``tokenizer.json``: for a run trained on an HF ``tokenizers`` file, that file byte for byte (transformers'
  ``PreTrainedTokenizerFast`` and our ``HFTokenizer`` read it), and ``tokenizer_config.json`` naming its
  end-of-document token, so ``AutoTokenizer.from_pretrained(DIR)`` loads it.

``read_tokenizer(export_dir)`` gives back the tokenizer an export carries.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from chimera.data.tokenizers import HFTokenizer, get_tokenizer
from chimera.errors import UserError

SPEC_FILE = "chimera_tokenizer.json"
HF_FILE = "tokenizer.json"


def write_tokenizer(source, out_dir: Path) -> None:
    """Write the tokenizer files of ``source`` (an ``ExportSource``) into ``out_dir``."""
    spec = source.tokenizer
    if spec.endswith(".json") and not Path(spec).is_file():
        raise UserError(f"the run's tokenizer file {spec!r} (data.tokenizer of {source.checkpoint}) does not exist; "
                        "restore it there to export the model with its tokenizer")
    tokenizer = get_tokenizer(spec)
    written = {"tokenizer": HF_FILE if isinstance(tokenizer, HFTokenizer) else spec, **tokenizer.identity()}
    if isinstance(tokenizer, HFTokenizer):
        shutil.copyfile(tokenizer.path, out_dir / HF_FILE)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.eos_token}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / SPEC_FILE).write_text(json.dumps(written, indent=2))


def read_tokenizer(export_dir: str | Path):
    """The tokenizer an export directory carries (``chimera.data.tokenizers``' ByteTokenizer, DNATokenizer or
    HFTokenizer)."""
    export_dir = Path(export_dir)
    spec_file = export_dir / SPEC_FILE
    if not spec_file.is_file():
        raise UserError(f"{export_dir} has no {SPEC_FILE}; pass a directory written by chimera export")
    spec = json.loads(spec_file.read_text())["tokenizer"]
    return get_tokenizer(str(export_dir / HF_FILE) if spec == HF_FILE else spec)
