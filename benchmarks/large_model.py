"""A large model on this machine: llama-1b (1.1 B parameters) at ZeRO-3 over 2 data-parallel ranks builds, steps,
saves and resumes; per-rank peak RSS and the time of each phase.

    .venv/bin/python benchmarks/large_model.py [--preset llama-1b] [--ranks 2] [--zero 3] [--out results.json]

Each rank runs the trainer's own calls: ``Trainer(cfg, run_dir)`` (topology, model, DeepSpeed engine), one
``train_step()``, ``save()``, then a fresh ``Trainer`` on the same run directory and ``resume_if_possible()``. After
each phase it records its peak resident set size so far (``ru_maxrss``) and the phase's wall time. The script only
uses calls that exist before and after the layout-free checkpoint change, so it measures either commit (run it with
``PYTHONPATH`` pointing at another checkout).
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


def worker(fields: list[str], run_dir: str, out: str) -> None:
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
        return result

    trainer = phase("build", lambda: Trainer(cfg, run_dir))
    phase("step", trainer.train_step)
    phase("save", trainer.save)
    del trainer
    resumed = phase("build again", lambda: Trainer(cfg, run_dir))
    phase("resume", resumed.resume_if_possible)
    phase("step after resume", resumed.train_step)
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
    p.add_argument("--out", default=None)
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker[0]), args.worker[1], args.worker[2])
        return
    from chimera.launch.local import launch

    fields = [f"model.preset={args.preset}", f"model.vocab_size=32000", f"parallel.zero_stage={args.zero}",
              "train.steps=4", "train.micro_batch_size=1", f"train.global_batch_size={args.ranks}",
              f"data.seq_len={args.seq_len}", "logging.wandb=disabled", "checkpoint.keep=1"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        start = time.perf_counter()
        code = launch(args.ranks, [sys.executable, __file__, "--worker", json.dumps(fields), str(Path(tmp) / "run"),
                                   str(out)])
        wall = time.perf_counter() - start
        if code:
            raise SystemExit(f"failed with exit code {code} after {wall:.0f} s")
        ranks = json.loads(out.read_text())
        ckpt = next((Path(tmp) / "run/checkpoints").glob("step_*"))
        size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    result = {"preset": args.preset, "ranks": args.ranks, "zero": args.zero, "wall_s": round(wall, 1),
              "checkpoint_gib": round(size / (1 << 30), 2), "per_rank": ranks,
              "commit": os.popen(f"git -C {REPO} rev-parse --short HEAD").read().strip()}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
