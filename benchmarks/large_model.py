"""A large model on this machine: llama-1b (1.1 B parameters) at ZeRO-3 over 2 data-parallel ranks builds, steps,
saves and resumes; per-rank peak RSS and the time of each phase.

    .venv/bin/python benchmarks/large_model.py [--preset llama-1b] [--ranks 2] [--zero 3] [--precision fp32]
        [--out results.json]

Two launches, as a run and its resumption are: the first runs the trainer's own calls ``Trainer(cfg, run_dir)``
(topology, model, DeepSpeed engine), one ``train_step()`` and ``save()``; the second, new processes on the same run
directory, ``Trainer(cfg, run_dir)``, ``resume_if_possible()`` and one ``train_step()``. After each phase every rank
records its peak resident set size so far (``ru_maxrss``) and the phase's wall time. The script only uses calls that
exist before and after the layout-free checkpoint change, so it measures either commit (run it with ``PYTHONPATH``
pointing at a folder whose ``chimera`` is the other checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # kB -> GiB


def worker(mode: str, fields: list[str], run_dir: str, out: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from chimera.configs.loader import load_run_config
    from chimera.trainer.loop import Trainer

    cfg = load_run_config(REPO / "configs/runs/tiny.yaml", fields)
    phases = []

    def phase(name, fn):
        dist.barrier() if dist.is_initialized() else None
        start = time.perf_counter()
        result = fn()
        dist.barrier() if dist.is_initialized() else None
        phases.append({"phase": name, "seconds": round(time.perf_counter() - start, 2), "peak_rss_gib": peak_gib()})
        print(f"rank {dist.get_rank()}: {phases[-1]}", flush=True)  # a run killed for memory shows how far it got
        return result

    trainer = phase("build", lambda: Trainer(cfg, run_dir))
    if mode == "first":
        phase("step", trainer.train_step)
        phase("save", trainer.save)
    else:
        phase("resume", trainer.resume_if_possible)
        phase("step after resume", trainer.train_step)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, phases)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(everyone, indent=1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama-1b")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--zero", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--set", action="append", default=[], help="more run-config fields, e.g. model.num_layers=8")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker[0], json.loads(args.worker[1]), args.worker[2], args.worker[3])
        return
    from chimera.launch.local import launch

    fields = [f"model.preset={args.preset}", f"parallel.zero_stage={args.zero}",
              "train.steps=4", "train.micro_batch_size=1", f"train.global_batch_size={args.ranks}",
              f"data.seq_len={args.seq_len}", f"train.precision={args.precision}", "logging.wandb=disabled",
              "checkpoint.keep=1", *args.set]
    import chimera

    with tempfile.TemporaryDirectory() as tmp:
        ranks, wall = [], 0.0
        for mode in ("first", "resume"):
            out = Path(tmp) / f"{mode}.json"
            start = time.perf_counter()
            code = launch(args.ranks, [sys.executable, __file__, "--worker", mode, json.dumps(fields),
                                       str(Path(tmp) / "run"), str(out)])
            wall += time.perf_counter() - start
            if code:
                raise SystemExit(f"{mode} launch failed with exit code {code} after {wall:.0f} s")
            phases = json.loads(out.read_text())
            ranks = [a + b for a, b in zip(ranks, phases)] if ranks else phases
            if mode == "first":
                ckpt = next((Path(tmp) / "run/checkpoints").glob("step_*"))
                size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    checkout = Path(chimera.__file__).parent
    result = {"preset": args.preset, "ranks": args.ranks, "zero": args.zero, "precision": args.precision,
              "fields": fields, "wall_s": round(wall, 1), "checkpoint_gib": round(size / (1 << 30), 2),
              "per_rank": ranks, "commit": os.popen(f"git -C {checkout} rev-parse --short HEAD").read().strip()}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
