"""``chimera bench-arch EXPERIMENT.yaml [--full-budget] [--out DIR]``: train every (model, task, lr, seed) of an
experiment in this process, one after another (``chimera.trainer.loop.train``, a run directory each under
``OUT/runs/``), evaluate each, and write ``OUT/results.json`` (validated against ``results.schema.json``) and the
plots under ``OUT/plots/``.

A run whose record (``RUN_DIR/bench.json``) exists is not trained or evaluated again: a rerun after an
interruption continues with the first unfinished run (whose own checkpoint, if any, it resumes from).

Per run: parameter count, final training loss (mean of the last 5 logged steps), the loss curve, latency per step
and throughput (medians over the steps after the first), peak memory (CUDA: the allocator's peak; CPU: the peak
resident set above the one at the start of the run, the process's high-water mark being reset before it), and
each suite's result.

``--slurm`` (``chimera.launch.bench_array``) submits the unfinished runs as one Slurm job array, a task per run, and
a job that waits for them and writes ``results.json`` and the plots; here ``plan``, ``run_one`` and ``collect`` are
what both ways share.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import dataclass
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


def unfinished(spec: RunSpec, result: dict) -> UserError:
    """The one line for a run that ended before its last step or without its final checkpoint."""
    why = result["stopped"] or "no final checkpoint"
    return UserError(f"run {spec.key} stopped at step {result['step']} of {spec.steps} ({why}); "
                     f"run the same command again to continue")


def train_and_evaluate(spec: RunSpec, exp: Experiment, run_dir: Path, cfg=None) -> tuple[dict, dict | None]:
    """Train one run (``cfg``: its config, default ``run_config(spec, exp)``) and evaluate it: ``train()``'s result
    and the run's record, or None for the record where a stop signal or the time limit stopped the training (it
    saved; the same run resumes from there)."""
    from chimera.evaluation.suites import run_suite
    from chimera.evaluation.target import load_target
    from chimera.trainer.loop import train

    cfg = cfg or run_config(spec, exp)
    memory = PeakMemory()
    memory.start()
    started = time.perf_counter()
    result = train(cfg, run_dir)
    train_seconds = time.perf_counter() - started
    peak = memory.peak_mb()
    if result["stopped"] and not result["final_save_failed"]:
        return result, None
    if result["stopped"] or result["final_save_failed"] or result["step"] < spec.steps:
        raise unfinished(spec, result)
    rows = [r for r in _metrics(run_dir) if r.get("loss") is not None]
    losses = [r["loss"] for r in rows]
    timed = rows[1:] or rows
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in timed)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    started = time.perf_counter()
    target = load_target(run_dir)
    evals = {suite: run_suite(suite, target, options) for suite, options in spec.task.eval.items()}
    eval_seconds = time.perf_counter() - started
    return result, {
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


@dataclass
class Plan:
    """An experiment's runs, checked, and where they go."""

    experiment_file: str
    experiment: Experiment
    specs: list[RunSpec]
    out_dir: Path
    full_budget: bool

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out_dir / "runs" / spec.key

    def record_file(self, spec: RunSpec) -> Path:
        return self.run_dir(spec) / RECORD

    def done(self, spec: RunSpec) -> bool:
        return self.record_file(spec).is_file()

    def spec(self, key: str) -> RunSpec:
        return next(s for s in self.specs if s.key == key)


def plan(experiment_path: str, out: str | None, full_budget: bool = False) -> Plan:
    """Every run of the experiment, widths solved and configs checked: bad input fails here, before any training."""
    exp = load_experiment(experiment_path)
    specs = run_specs(exp, full_budget)
    for spec in specs:
        run_config(spec, exp)
    return Plan(str(experiment_path), exp, specs, Path(out or Path("runs") / "bench" / exp.name), full_budget)


def announce(p: Plan) -> None:
    print(f"chimera: bench-arch {p.experiment.name}: {len(p.specs)} runs "
          f"({'full' if p.full_budget else 'reduced'} budget) -> {p.out_dir}", flush=True)
    for v in {s.variant.name: s.variant for s in p.specs}.values():
        print(f"  model {v.name}: {v.preset}, d_model {v.d_model}, {v.parameters:,} parameters", flush=True)


def run_one(p: Plan, spec: RunSpec, cfg=None, label: str = "") -> dict:
    """Train and evaluate one run and write its record (``RUN_DIR/bench.json``); returns ``train()``'s result
    (``stopped``: saved before the end, no record yet)."""
    print(f"{label}{spec.key}: {spec.steps} steps of {spec.seq_len} tokens x "
          f"{p.experiment.train.get('global_batch_size', 8)}", flush=True)
    result, record = train_and_evaluate(spec, p.experiment, p.run_dir(spec), cfg)
    if record is not None:
        record = finite_or_none(record)
        write_json(p.record_file(spec), record)
        print(f"{label}{spec.key}: final loss {record['final_loss']:.4f}, accuracy {_text(record['accuracy'])}, "
              f"{record['throughput_tokens_per_s']:,.0f} tokens/s", flush=True)
    return result


def collect(p: Plan) -> int:
    """``results.json`` (validated) and the plots from every run's record; every run must have finished."""
    missing = [s.key for s in p.specs if not p.done(s)]
    if missing:
        raise UserError(f"{len(missing)} of {len(p.specs)} runs have not finished (first: {missing[0]}); run "
                        f"`chimera bench-arch {p.experiment_file} --out {p.out_dir}` again (with --slurm: submitted)")
    records = [json.loads(p.record_file(s).read_text()) for s in p.specs]
    import torch

    results = {"experiment": p.experiment.name, "experiment_file": p.experiment_file,
               "budget": "full" if p.full_budget else "reduced", "device": device_name(),
               "torch": torch.__version__, "created": datetime.now(UTC).isoformat(timespec="seconds"),
               "runs": records}
    validate_results(results)
    write_json(p.out_dir / "results.json", results)
    from chimera.evaluation.plots import plot_experiment
    from chimera.evaluation.table import format_table

    written = plot_experiment(results, p.out_dir / "plots")
    print(format_table([{"run": r["key"], "parameters": r["parameters"], "final_loss": r["final_loss"],
                         "accuracy": r["accuracy"], "tokens/s": r["throughput_tokens_per_s"],
                         "peak MB": r["peak_memory_mb"]} for r in records]))
    print(f"chimera: wrote {p.out_dir / 'results.json'} and {len(written)} plots in {p.out_dir / 'plots'}")
    return 0


def bench_arch(experiment_path: str, out: str | None, full_budget: bool = False) -> int:
    """Every run in this process, one after another, then ``collect``."""
    p = plan(experiment_path, out, full_budget)
    p.out_dir.mkdir(parents=True, exist_ok=True)
    announce(p)
    for i, spec in enumerate(p.specs, 1):
        label = f"[{i}/{len(p.specs)}] "
        if p.done(spec):
            print(f"{label}{spec.key}: done before, skipped", flush=True)
            continue
        result = run_one(p, spec, label=label)
        if result["stopped"]:
            raise unfinished(spec, result)
    return collect(p)
