"""Loader throughput (tokens/s per rank) for WebDataset and zarr sources vs the default model's training rate.

The standard library's sources are prepared in both formats (byte tokens); the loader then produces
the demo run's batches (seq 256 x 16 per step) for one rank, timing ``plan`` + ``micro_batches``
over many steps from a cold start (shards and chunks are read and decoded as they are reached).
The default preset's training tokens/s is measured in the same run, and the ratio printed.

usage: python benchmarks/loader_throughput.py [--steps N] [--model-steps N]
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

warnings.filterwarnings("ignore")

from chimera.configs.loader import load_run_config  # noqa: E402
from chimera.configs.schema import DataConfig  # noqa: E402
from chimera.data.builtin import stdlib_files  # noqa: E402
from chimera.data.loader import DataPipeline  # noqa: E402
from chimera.data.prepare import prepare  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "configs/runs/demo.yaml"


def loader_rate(source: dict, steps: int, packing: str) -> float:
    cfg = DataConfig(sources=[source], seq_len=256, packing=packing)
    return produce(DataPipeline(cfg, micro_batch_size=16, global_batch_size=16), steps)


def produce(data: DataPipeline, steps: int, step_s: float = 0.0) -> float:
    """Tokens/s of one rank producing ``steps`` steps' batches from the start, ``step_s`` seconds of simulated
    training after each."""
    state, tokens = data.initial_state(), 0
    start = time.perf_counter()
    for step in range(steps):
        plan = data.plan(step, state)
        tokens += sum(b["input_ids"].numel() for b in data.micro_batches(plan, 0, 1))
        state = plan.next_state
        if step_s:
            time.sleep(step_s)
    return tokens / (time.perf_counter() - start)


def model_rate(steps: int) -> float:
    from chimera.trainer.loop import Trainer

    cfg = load_run_config(DEMO, ["logging.wandb=disabled"])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir)
        trainer.train_step()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        return steps * trainer.tokens_per_step / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--model-steps", type=int, default=5)
    args = parser.parse_args()
    files = [str(p) for _, p in stdlib_files()]
    with tempfile.TemporaryDirectory() as tmp:
        prepare(files, "bytes", "webdataset", f"{tmp}/wds", shard_mb=16, progress=False)
        prepare(files, "bytes", "zarr", f"{tmp}/zarr", chunk_tokens=1 << 18, progress=False)
        rates = {}
        for packing in ("concat", "boundaries"):
            rates[f"webdataset, {packing}"] = loader_rate({"type": "webdataset", "path": f"{tmp}/wds"}, args.steps,
                                                          packing)
            rates[f"zarr, {packing}"] = loader_rate({"type": "zarr", "path": f"{tmp}/zarr"}, args.steps, packing)
    consume = model_rate(args.model_steps)
    print(f"# {date.today()} | {sysconfig.get_platform()} | 1 rank, seq 256 x 16, {args.steps} steps from cold")
    print("| source | loader tokens/s | x griffin-small training rate |")
    print("|---|---:|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {rate / consume:,.0f}x |")
    print(f"| griffin-small training (consumer) | {consume:,.0f} | 1x |")


if __name__ == "__main__":
    main()
