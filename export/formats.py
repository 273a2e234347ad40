"""The export formats, by name: each is a module with two functions,

* ``refusal(source: ExportSource) -> str | None``: why this format cannot express the model (None: it can);
* ``write(source: ExportSource, out_dir: Path, dtype: torch.dtype) -> None``: write the files into ``out_dir``,
  an empty directory the exporter made (a temporary one, renamed into place when ``write`` returns).

The exporter (``chimera.export.exporter``) does the rest: choosing the checkpoint, refusing a non-empty output
directory, the temporary directory and rename, the tokenizer files and ordinary file permissions.
"""

from __future__ import annotations

import importlib
import importlib.util

FORMAT_MODULES = {
    "safetensors": "chimera.export.safetensors_format",
    "hf": "chimera.export.hf",
    "onnx": "chimera.export.onnx",
    "gguf": "chimera.export.gguf",
}


def format_module(name: str):
    from chimera.errors import UserError

    if name not in FORMAT_MODULES:
        raise UserError(f"--format {name!r}: unknown; choose one of {', '.join(FORMAT_MODULES)}")
    try:
        return importlib.import_module(FORMAT_MODULES[name])
    except ModuleNotFoundError as e:
        if e.name != FORMAT_MODULES[name]:
            raise
        raise UserError(f"--format {name}: not available in this version of chimera; choose one of "
                        f"{', '.join(n for n in FORMAT_MODULES if importlib.util.find_spec(FORMAT_MODULES[n]))}") \
            from None
