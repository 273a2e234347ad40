"""The built-in corpus: the running interpreter's standard-library sources (on every machine).

Files are found via ``sysconfig`` and listed in sorted order; a file belongs to the validation split
when a hash of its relative path falls under ``val_fraction`` (so the split is the same on every
machine with the same Python, whatever the order files are found in).
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

from chimera.errors import UserError

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
TEST_DIRS = {"test", "tests"}


def stdlib_files(include_tests: bool = False) -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        parts = set(rel.parts[:-1])
        if parts & SKIP_DIRS or (not include_tests and parts & TEST_DIRS):
            continue
        files.append((rel.as_posix(), path))
    files.sort()
    if not files:
        raise UserError(f"no Python sources found under {root}; the built-in corpus needs the standard library")
    return files


def in_validation(rel_path: str, val_fraction: float) -> bool:
    return zlib.crc32(rel_path.encode()) % 10_000 < val_fraction * 10_000
