"""The CPU linear scan's two forward algorithms, ``Sequential`` (one step per time step) and ``TwoLevel`` (chunks of
~sqrt(T) steps at once, then the chunk ends), over shapes ``T x rows x channels``: the median of 5 runs each, and the
max |difference| of their states. Where ``TwoLevel`` wins sets ``chimera.models.scan.TWO_LEVEL_BELOW``.

    .venv/bin/python benchmarks/cpu_scan.py
"""

from __future__ import annotations

import platform
import statistics
import time
from datetime import date

import torch

from chimera.models import scan

SHAPES = [(16384, 1, 192), (2048, 1, 768), (4096, 4, 192), (256, 8, 192), (16384, 1, 1024), (1024, 16, 192)]


def median_ms(fn, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    print(f"# {date.today()} | {platform.machine()} | torch {torch.__version__} | threads {torch.get_num_threads()}"
          " | fp32, forward states only")
    print("| T x rows x channels | elements per step | Sequential ms | TwoLevel ms | speed-up | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for T, rows, channels in SHAPES:
        a = torch.rand(T, rows, channels, generator=g) * 0.5 + 0.5
        b = torch.randn(T, rows, channels, generator=g)
        diff = (scan.Sequential.states(a, b) - scan.TwoLevel.states(a, b)).abs().max().item()
        seq = median_ms(lambda a=a, b=b: scan.Sequential.states(a, b))
        two = median_ms(lambda a=a, b=b: scan.TwoLevel.states(a, b))
        print(f"| {T:,} x {rows} x {channels} | {rows * channels:,} | {seq:.1f} | {two:.1f} | {seq / two:.2f}x | "
              f"{diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
