"""The routed hybrid (DynamicHybridModel) against Granite-4.0-H of the same shape, in one run.

Each preset trains through `chimera train` on the same data (the built-in corpus), from the same seed, for the
same steps and tokens; reported per preset: parameters, training tokens/s (mean after the first steps, and its ratio
to the first preset), peak memory (the metrics line's ``peak_memory_gib``: RSS on CPU, the allocator's peak on a
GPU), the mean training loss of the last steps and the last validation loss, and for routed blocks the mean
fraction of tokens each path took. The default pair is ``granite-tiny`` and ``dynamic-hybrid-tiny`` (Granite's
shape, each Mamba-2/attention layer a routed block holding both paths).

usage: python benchmarks/dynamic_hybrid.py [--presets a,b] [--steps N] [--seq-len N] [--batch N] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from datetime import date
from pathlib import Path

from chimera_cli import chimera  # benchmarks/, the script's folder

REPO = Path(__file__).resolve().parents[1]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="granite-tiny,dynamic-hybrid-tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], help="a run-config override for every preset")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="chimera-routed-bench-"))
    listing = chimera("models").stdout
    rows = []
    for preset in args.presets.split(","):
        run = work / preset
        overrides = [f"model.preset={preset}", f"data.seq_len={args.seq_len}", f"train.steps={args.steps}",
                     f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}",
                     f"train.eval_every={args.steps}", "logging.progress=false", "logging.rank_stats_every=10",
                     *args.set]
        flags = [a for o in overrides for a in ("--set", o)]
        chimera("train", REPO / "configs/runs/demo.yaml", "--run-dir", run, *flags)
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in metrics if "tokens_per_s" in r]
        tail = steps[-max(1, len(steps) // 10):]
        paths = {p: mean([v for r in tail for k, v in r.items()
                          if k.startswith("routed/") and k.endswith(f"/fraction_{p}")])
                 for p in ("ssm", "attention", "residual")}
        params = int(listing.split(preset, 1)[1].split()[0].replace(",", ""))
        rows.append({"preset": preset, "params": params,
                     "tok_s": mean([r["tokens_per_s"] for r in steps[3:]]),
                     "peak_gib": max(r["peak_memory_gib"] for r in steps if "peak_memory_gib" in r),
                     "loss": mean([r["loss"] for r in tail]),
                     "val": [r["val_loss"] for r in metrics if "val_loss" in r][-1], "paths": paths})
    import torch

    print(f"# {date.today()} | {platform.processor() or platform.machine()} | torch {torch.__version__} | threads "
          f"{torch.get_num_threads()} | built-in corpus, {args.steps} steps x {args.batch} x {args.seq_len} tokens, "
          f"fp32, 1 process | {' '.join(args.set)}")
    print("| preset | parameters | tok/s | vs first | peak memory GiB | train loss (last 10%) | val loss "
          "| tokens to SSM / attention / residual |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        p = r["paths"]
        split = "-" if p["ssm"] != p["ssm"] else f"{p['ssm']:.2f} / {p['attention']:.2f} / {p['residual']:.2f}"
        print(f"| {r['preset']} | {r['params']:,} | {r['tok_s']:,.0f} | {r['tok_s'] / rows[0]['tok_s']:.2f}x "
              f"| {r['peak_gib']:.3f} | {r['loss']:.3f} | {r['val']:.3f} | {split} |")


if __name__ == "__main__":
    main()
