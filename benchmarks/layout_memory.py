"""Per-rank parameter + optimizer bytes under data parallelism x ZeRO and pipeline stages, against the ideal 1/DP and
1/PP; and the measured pipeline bubble against (P - 1) / (M + P - 1).

    .venv/bin/python benchmarks/layout_memory.py [--preset griffin-small] [--out results.json]

Each layout is one real run (``chimera.launch.local`` ranks, the trainer, one optimizer step); each rank reports what
it holds (``TrainingEngine.held_bytes``: parameters and AdamW state, from the tensors themselves) and, with pipeline
stages, how long its stage computed (forward and backward passes) within the step's 1F1B schedule (the step without
the gradient reductions and the optimizer step that follow it). The bubble of a stage is ``1 - busy / schedule
time``; its ideal, a balanced 1F1B schedule's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(spec: dict, out: str) -> None:
    """One rank of one layout."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from chimera.configs.loader import load_run_config
    from chimera.parallel import topology
    from chimera.trainer.loop import Trainer

    cfg = load_run_config(REPO / "configs/runs/tiny.yaml", spec["fields"])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir)
        busy, after = [0.0], [0.0]  # forward/backward passes; the reductions and optimizer step after the schedule
        if trainer.engine.pipelined:  # time this stage's instructions within the step
            ds = trainer.engine.ds
            timed = dict(ds._INSTRUCTION_MAP)
            for kind in timed:
                into = {"ForwardPass": busy, "BackwardPass": busy, "ReduceGrads": after, "ReduceTiedGrads": after,
                        "OptimizerStep": after}.get(kind.__name__)
                if into is None:
                    continue

                def run(self, *args, _f=timed[kind], _into=into, **kwargs):
                    start = time.perf_counter()
                    _f(self, *args, **kwargs)
                    _into[0] += time.perf_counter() - start
                timed[kind] = run
            ds._INSTRUCTION_MAP = timed
        trainer.train_step()  # warm-up: the optimizer state exists after it
        busy[0] = after[0] = 0.0
        dist.barrier()
        start = time.perf_counter()
        trainer.train_step()
        elapsed = time.perf_counter() - start
        mine = {**trainer.engine.held_bytes(), "stage": trainer.topo.pipeline_rank, "busy": busy[0],
                "schedule": elapsed - after[0]}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        if dist.get_rank() == 0:
            Path(out).write_text(json.dumps(everyone))
    topology.shutdown()


def run(ranks: int, fields: list[str]) -> list[dict]:
    from chimera.launch.local import launch

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        spec = json.dumps({"fields": fields})
        code = launch(ranks, [sys.executable, __file__, "--worker", spec, str(out)])
        if code:
            raise SystemExit(f"layout {fields} failed with exit code {code}")
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="griffin-small")
    p.add_argument("--out", default=None)
    p.add_argument("--only-bubble", action="store_true")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker[0]), args.worker[1])
        return
    os.environ.setdefault("PYTHONPATH", str(REPO.parent))
    base = [f"model.preset={args.preset}", "train.steps=2", "data.seq_len=128", "logging.wandb=disabled",
            "train.warmup_steps=1"]
    rows = {"memory": [], "bubble": []}
    single = None
    for dp in () if args.only_bubble else (1, 2, 4):
        for zero in (0, 1, 2, 3):
            if dp == 1 and zero:
                continue
            fields = base + [f"parallel.zero_stage={zero}", "train.micro_batch_size=2",
                             f"train.global_batch_size={2 * dp}"]
            ranks = run(dp, fields)
            held = max(r["parameters"] + r["optimizer"] for r in ranks)
            single = single or held
            # ideal, per parameter element, fp32: parameters 4 bytes (ZeRO-3: / dp), AdamW moments 8 (ZeRO-0, on the
            # parameters themselves), or master copy + moments 12 / dp (ZeRO 1-3); relative to DP=1 ZeRO-0's 12
            ideal = {0: 12, 1: 4 + 12 / dp, 2: 4 + 12 / dp, 3: 16 / dp}[zero] / 12
            rows["memory"].append({"layout": f"DP={dp} ZeRO-{zero}", "bytes": held, "ratio": held / single,
                                   "ideal": ideal})
            print(rows["memory"][-1], flush=True)
    for pp in () if args.only_bubble else (2, 4):
        fields = base + [f"parallel.pipeline={pp}", "train.micro_batch_size=2", "train.global_batch_size=2"]
        ranks = run(pp, fields)
        held = max(r["parameters"] + r["optimizer"] for r in ranks)
        rows["memory"].append({"layout": f"PP={pp}", "bytes": held, "ratio": held / single, "ideal": 1 / pp,
                               "per_stage": [r["parameters"] + r["optimizer"] for r in ranks]})
        print(rows["memory"][-1], flush=True)
    for micro in (1, 2, 4, 8):
        fields = base + ["parallel.pipeline=2", "train.micro_batch_size=2", f"train.global_batch_size={2 * micro}"]
        ranks = run(2, fields)
        measured = [1 - r["busy"] / r["schedule"] for r in ranks]
        rows["bubble"].append({"stages": 2, "micro_batches": micro, "measured": measured,
                               "ideal": 1 / (micro + 1)})
        print(rows["bubble"][-1], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
