"""Loader tokens/s from slow shard reads, with and without loading shards ahead (WebDataset prefetch).

The standard library's sources are prepared as WebDataset shards (byte tokens, ``--shard-mb`` each) and
read through ``pipe:sleep DELAY; cat SHARD``: a stand-in for an object store with ``DELAY`` seconds of
latency per shard. One rank produces the demo run's batches (seq 256 x 16 per step) for ``--steps`` steps
from a cold start (default: one epoch), timing ``plan`` + ``micro_batches``; ``--step-ms`` adds a simulated
training step after each batch (the time prefetch can hide reads behind). Printed per configuration:
tokens/s and the seconds the loop waited for shards (``data_wait_s`` of ``DataPipeline.read_stats``).

usage: python benchmarks/remote_shards.py [--delay S] [--shard-mb MB] [--steps N] [--step-ms MS]
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
import warnings
from datetime import date

warnings.filterwarnings("ignore")

from loader_throughput import produce  # noqa: E402 (beside this script)

from chimera.configs.schema import DataConfig  # noqa: E402
from chimera.data import loader  # noqa: E402
from chimera.data.builtin import stdlib_files  # noqa: E402
from chimera.data.dataset_files import read_manifest  # noqa: E402
from chimera.data.prepare import prepare  # noqa: E402
from chimera.data.sources import WebDatasetSource  # noqa: E402

SEQ, ROWS = 256, 16


def loader_rate(path: str, urls: str | None, prefetch: int, steps: int | None, step_s: float) -> tuple[float, float]:
    """(tokens/s, seconds waited for shards) of one rank reading ``steps`` steps with ``prefetch`` shards ahead."""
    build = lambda spec, name, cfg, bad: WebDatasetSource(  # noqa: E731
        spec.path, name, bad, cfg.verify_checksums, spec.urls, prefetch_shards=prefetch)
    loader.build_source = build
    cfg = DataConfig(sources=[{"type": "webdataset", "name": "web", "path": path, "urls": urls}], seq_len=SEQ)
    data = loader.DataPipeline(cfg, micro_batch_size=ROWS, global_batch_size=ROWS)
    rate = produce(data, steps or data.streams[0].train.epoch_tokens // (SEQ * ROWS), step_s)
    data.streams[0].source.wait_for_loads_ahead()  # the shards read ahead past the last step, before their files go
    return rate, data.read_stats()["data_wait_s/web"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.2, help="seconds each shard read sleeps first")
    parser.add_argument("--shard-mb", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=None, help="default: one epoch")
    parser.add_argument("--step-ms", type=float, default=0.0, help="simulated training time per step")
    args = parser.parse_args()
    build_source = loader.build_source
    files = [str(p) for _, p in stdlib_files()]
    with tempfile.TemporaryDirectory() as tmp:
        prepare(files, "bytes", "webdataset", f"{tmp}/wds", shard_mb=args.shard_mb, progress=False)
        last = len(read_manifest(f"{tmp}/wds")[1]["shards"]) - 1
        slow = f"pipe:sleep {args.delay}; cat {tmp}/wds/shard-{{000000..{last:06d}}}.tar"
        cases = [("local files, no prefetch", None, 0)] + [
            (f"pipe:sleep {args.delay}; cat, prefetch {k}", slow, k) for k in (0, 1, 2, 4)]
        rows = [(name, *loader_rate(f"{tmp}/wds", urls, k, args.steps, args.step_ms / 1000)) for name, urls, k in cases]
    loader.build_source = build_source
    print(f"# {date.today()} | {sysconfig.get_platform()} | 1 rank, seq {SEQ} x {ROWS}, {last + 1} shards of "
          f"{args.shard_mb} MB, {args.steps or 'one epoch of'} steps from cold, {args.step_ms} ms per step simulated")
    print("| shards read from | loader tokens/s | waited for shards (s) |")
    print("|---|---:|---:|")
    for name, rate, waited in rows:
        print(f"| {name} | {rate:,.0f} | {waited:.2f} |")


if __name__ == "__main__":
    main()
