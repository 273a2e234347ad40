"""The `chimera` command line as the benchmarks run it: one subprocess, its failure one message."""

from __future__ import annotations

import subprocess
import sys


def chimera(*args) -> subprocess.CompletedProcess:
    """Run ``python -m chimera.launch.cli ARGS``; exit with its stderr's tail if it fails."""
    proc = subprocess.run([sys.executable, "-m", "chimera.launch.cli", *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"chimera {' '.join(map(str, args[:3]))} failed:\n{proc.stderr[-3000:]}")
    return proc
