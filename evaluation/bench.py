"""``chimera bench-arch EXPERIMENT.yaml [--full-budget] [--out DIR]``: train every (model, task, lr, seed) of an
experiment in this process, one after another (``chimera.trainer.loop.train``, a run directory each under
``OUT/runs/``), evaluate each, and write ``OUT/results.json`` (validated against ``results.schema.json``) and the
plots under ``OUT/plots/``.

A run whose record (``RUN_DIR/bench.json``) exists is not trained or evaluated again: a rerun after an
interruption continues with the first unfinished run (whose own checkpoint, if any, it resumes from).

Per run: parameter count, final training loss (mean of the last 5 logged steps), the loss curve, latency per step
and throughput (medians over the steps after the first), peak memory (CUDA: the allocator's peak; CPU: the peak
resident set above the one at the start of the run, the process's high-water mark being reset before it), and
each suite's result. Slurm job arrays are not used yet: runs are local.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

from chimera.errors import UserError
from chimera.evaluation.cli import write_json
from chimera.evaluation.experiment import Experiment, RunSpec, load_experiment, run_config, run_specs

RECORD = "bench.json"
SCHEMA = Path(__file__).with_name("results.schema.json")


# ---- memory ----------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """The peak memory of what runs between ``start()`` and ``peak_mb()``."""

    def start(self) -> None:
        import torch

        from chimera.trainer.host_memory import release_free_host_memory

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        release_free_host_memory()
        try:  # Linux: writing 5 resets the high-water mark VmHWM to the current resident set
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _status_kb("VmRSS")
        except OSError:
            self.base = None

    def peak_mb(self) -> float | None:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        peak = _status_kb("VmHWM")
        return None if self.base is None or peak is None else max(0, peak - self.base) / 1024


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---- one run ---------------------------------------------------------------------------------------


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def finite_or_none(value):
    """``value`` with every NaN or infinity replaced by None (JSON has neither; "not measured" is null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def _text(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def headline_accuracy(evals: dict) -> float | None:
    """The run's accuracy: MQAR's at its grid, else the Chomsky test-length accuracy, else longctx's."""
    for suite in ("mqar", "chomsky", "longctx"):
        if suite in evals:
            return evals[suite]["summary"].get("accuracy")
    return None


def train_and_evaluate(spec: RunSpec, exp: Experiment, run_dir: Path) -> dict:
    from chimera.evaluation.suites import run_suite
    from chimera.evaluation.target import load_target
    from chimera.trainer.loop import train

    cfg = run_config(spec, exp)
    memory = PeakMemory()
    memory.start()
    started = time.perf_counter()
    result = train(cfg, run_dir)
    train_seconds = time.perf_counter() - started
    peak = memory.peak_mb()
    if result["stopped"] or result["final_save_failed"] or result["step"] < spec.steps:
        raise UserError(f"run {spec.key} stopped at step {result['step']} of {spec.steps} "
                        f"({result['stopped'] or 'no final checkpoint'}); run the same command again to continue")
    rows = [r for r in _metrics(run_dir) if r.get("loss") is not None]
    losses = [r["loss"] for r in rows]
    timed = rows[1:] or rows
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in timed)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    started = time.perf_counter()
    target = load_target(run_dir)
    evals = {suite: run_suite(suite, target, options) for suite, options in spec.task.eval.items()}
    eval_seconds = time.perf_counter() - started
    return {
        "key": spec.key, "model": spec.variant.name, "model_entry": spec.variant.entry, "preset": spec.variant.preset,
        "task": spec.task.name, "task_kind": spec.task.task, "lr": spec.lr, "seed": spec.seed,
        "run_dir": str(run_dir), "config": cfg.model_dump(mode="json"),
        "parameters": target.num_parameters(), "d_model": spec.variant.d_model, "steps": spec.steps,
        "seq_len": spec.seq_len, "tokens": spec.steps * tokens_per_step,
        "final_loss": statistics.fmean(losses[-5:]), "loss_curve": [[r["step"], r["loss"]] for r in rows],
        "latency_s_per_step": tokens_per_step / tokens_per_s, "throughput_tokens_per_s": tokens_per_s,
        "peak_memory_mb": peak, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "accuracy": headline_accuracy(evals),
        "longctx": evals["longctx"]["rows"] if "longctx" in evals else [],
        "eval": evals,
    }


# ---- the experiment --------------------------------------------------------------------------------


def validate_results(results: dict) -> None:
    """``results`` against the shipped JSON schema (jsonschema); a mismatch raises ``jsonschema.ValidationError``."""
    import jsonschema

    jsonschema.validate(results, json.loads(SCHEMA.read_text()))


def bench_arch(experiment_path: str, out: str | None, full_budget: bool = False) -> int:
    exp = load_experiment(experiment_path)
    specs = run_specs(exp, full_budget)  # widths solved, configs checked: bad input fails before any training
    for spec in specs:
        run_config(spec, exp)
    out_dir = Path(out or Path("runs") / "bench" / exp.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"chimera: bench-arch {exp.name}: {len(specs)} runs ({'full' if full_budget else 'reduced'} budget) "
          f"-> {out_dir}", flush=True)
    for v in {s.variant.name: s.variant for s in specs}.values():
        print(f"  model {v.name}: {v.preset}, d_model {v.d_model}, {v.parameters:,} parameters", flush=True)
    records = []
    for i, spec in enumerate(specs, 1):
        run_dir = out_dir / "runs" / spec.key
        record_file = run_dir / RECORD
        if record_file.is_file():
            print(f"[{i}/{len(specs)}] {spec.key}: done before, skipped", flush=True)
            records.append(json.loads(record_file.read_text()))
            continue
        print(f"[{i}/{len(specs)}] {spec.key}: {spec.steps} steps of {spec.seq_len} tokens x "
              f"{exp.train.get('global_batch_size', 8)}", flush=True)
        record = finite_or_none(train_and_evaluate(spec, exp, run_dir))
        write_json(record_file, record)
        records.append(record)
        print(f"[{i}/{len(specs)}] {spec.key}: final loss {record['final_loss']:.4f}, accuracy "
              f"{_text(record['accuracy'])}, {record['throughput_tokens_per_s']:,.0f} tokens/s", flush=True)
    import torch

    results = {"experiment": exp.name, "experiment_file": str(experiment_path),
               "budget": "full" if full_budget else "reduced", "device": device_name(),
               "torch": torch.__version__, "created": datetime.now(UTC).isoformat(timespec="seconds"),
               "runs": records}
    validate_results(results)
    write_json(out_dir / "results.json", results)
    from chimera.evaluation.plots import plot_experiment
    from chimera.evaluation.table import format_table

    written = plot_experiment(results, out_dir / "plots")
    print(format_table([{"run": r["key"], "parameters": r["parameters"], "final_loss": r["final_loss"],
                         "accuracy": r["accuracy"], "tokens/s": r["throughput_tokens_per_s"],
                         "peak MB": r["peak_memory_mb"]} for r in records]))
    print(f"chimera: wrote {out_dir / 'results.json'} and {len(written)} plots in {out_dir / 'plots'}")
    return 0
