"""Test helpers: model builders and running the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_model(preset: str, seed: int = 0, overrides=(), sequence_parallel: bool = False):
    from chimera.configs.loader import load_model_config
    from chimera.models.causal_lm import CausalLM
    from chimera.parallel.layers import TPLayout
    from chimera.parallel.sharding import initialize_parameters

    cfg = load_model_config(preset, list(overrides))
    model = CausalLM(cfg, TPLayout.current(sequence_parallel))
    initialize_parameters(model, seed)
    return model


def run_chimera(*args, cwd=None, timeout=900, env=None) -> subprocess.CompletedProcess:
    """Run the ``chimera`` CLI as a user would; returns the completed process (text output)."""
    full_env = dict(os.environ, WANDB_MODE="offline", **(env or {}))
    full_env.pop("RANK", None)
    full_env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "chimera.launch.cli", *map(str, args)], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def read_metrics(run_dir) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
