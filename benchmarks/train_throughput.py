"""Training throughput (tokens/s) of the default preset in one process, beside its peers.

Each preset trains through the real path (DeepSpeed engine, built-in corpus) with the demo run's
settings; after warm-up steps, the timed steps give tokens/s. Peers run in the same process, so
their ratios to the default hold even on a noisy machine.

usage: python benchmarks/train_throughput.py [--steps N] [--warmup N] [--presets a,b,...]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from chimera.configs.loader import load_run_config  # noqa: E402
from chimera.trainer.loop import Trainer  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "configs/runs/demo.yaml"


def seconds_per_step(cfg, steps: int, warmup: int) -> tuple[float, int]:
    """(seconds per training step after ``warmup`` untimed ones, tokens per step) of the run ``cfg``."""
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir)
        for _ in range(warmup):
            trainer.train_step()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        return (time.perf_counter() - start) / steps, trainer.tokens_per_step


def measure(preset: str, steps: int, warmup: int) -> float:
    seconds, tokens = seconds_per_step(load_run_config(DEMO, [f"model.preset={preset}", "logging.wandb=disabled"]),
                                       steps, warmup)
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--presets", default="griffin-small,hawk-small,local-transformer-small,transformer-small")
    args = parser.parse_args()
    presets = args.presets.split(",")
    results = {p: measure(p, args.steps, args.warmup) for p in presets}
    base = results[presets[0]]
    print(f"# {date.today()} | {platform.processor() or platform.machine()} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | seq 256 x batch 16, fp32, 1 process, ZeRO-0")
    print(f"| preset | tokens/s | ratio to {presets[0]} |")
    print("|---|---:|---:|")
    for p, tps in results.items():
        print(f"| {p} | {tps:,.0f} | {tps / base:.2f} |")


if __name__ == "__main__":
    main()
