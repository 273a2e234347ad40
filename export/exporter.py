"""``chimera export``: one checkpoint of a run -> a directory of files another runtime loads.

The steps, each a refusal (one line, exit 2) before anything is written when it fails:

1. the format exists, the dtype is one of ``DTYPES``, the output directory is new or empty (or ``overwrite``);
2. the checkpoint (``--step N``, default the newest valid one) is read and checked against its manifest;
3. the format can express the model (``refusal(source)``).

Then the format writes into a temporary directory beside the target, the tokenizer files join it (except for gguf,
which holds its tokenizer itself), every file gets mode 0644 and every directory 0755 (some writers, safetensors'
``save_file`` among them, create their files 0600), and the directory is renamed into place. With ``overwrite`` an
existing target is replaced only once the new directory is complete; a failure at any point leaves the target as it
was and no temporary directory behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from chimera.errors import UserError
from chimera.export.formats import format_module
from chimera.export.source import load_source
from chimera.export.tokenizer_files import write_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FILE_MODE, DIR_MODE = 0o644, 0o755
CARRIES_OWN_TOKENIZER = {"gguf"}  # formats holding the tokenizer in their own file
SHARDED = {"safetensors", "hf"}  # formats whose write takes max_shard_bytes


def export(run_dir: str | Path, fmt: str, out: str | Path, *, step: int | None = None, dtype: str = "fp32",
           overwrite: bool = False, max_shard_mb: float | None = None, max_len: int | None = None) -> Path:
    """Export ``step`` (None: the newest valid checkpoint) of ``run_dir`` (a run or checkpoint directory) as ``fmt``
    into the directory ``out``, its tensors in ``dtype`` (safetensors, hf: in files of at most ``max_shard_mb``
    MiB, default 2 GiB; onnx: with a decoding cache of ``max_len`` tokens); returns ``out``."""
    module = format_module(fmt)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: unknown; choose one of {', '.join(DTYPES)}")
    options = {}
    if max_shard_mb is not None:
        if fmt not in SHARDED:
            raise UserError(f"--max-shard-mb applies to --format {' or '.join(sorted(SHARDED))}, not {fmt}")
        if not max_shard_mb > 0:
            raise UserError(f"--max-shard-mb {max_shard_mb}: must be positive")
        options["max_shard_bytes"] = int(max_shard_mb * 1024**2)
    if max_len is not None:
        if fmt != "onnx":
            raise UserError(f"--max-len applies to --format onnx, not {fmt}")
        if max_len < 2:
            raise UserError(f"--max-len {max_len}: must be at least 2 (a prompt token and a new one)")
        options["max_len"] = max_len
    out = Path(out)
    check_target(out, overwrite)
    source = load_source(run_dir, step)
    why = module.refusal(source)
    if why is not None:
        raise UserError(f"--format {fmt}: {why}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        module.write(source, tmp, DTYPES[dtype], **options)
        if fmt not in CARRIES_OWN_TOKENIZER:
            write_tokenizer(source, tmp)
        ordinary_permissions(tmp)
        replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # the file system's refusal (a full disk, a quota): nothing was changed
            raise UserError(f"--out {str(out)!r}: writing the export failed ({e.strerror or e}); nothing was "
                            "changed there") from None
        raise
    return out


def check_target(out: Path, overwrite: bool) -> None:
    """``out`` may be written: it does not exist, is an empty directory, or ``overwrite`` allows replacing it."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a directory; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {str(out)!r} exists and is not empty; choose a new directory, or pass --overwrite "
                        "to replace it")


def ordinary_permissions(root: Path) -> None:
    """Files 0644, directories 0755: what an export is (readable by everyone, like a download)."""
    os.chmod(root, DIR_MODE)
    for path in root.rglob("*"):
        os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)


def replace_dir(new: Path, target: Path) -> None:
    """Rename the complete directory ``new`` to ``target``; an existing ``target`` is moved aside first and deleted
    only after the rename, or moved back when it fails."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / target.name, target)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
