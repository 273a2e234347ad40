"""PNG figures (matplotlib, Agg backend: no display needed).

* ``plot_runs``: loss, validation loss and tokens per second against step, from ``metrics.jsonl`` of runs;
* ``plot_experiment``: from a bench-arch ``results.json``: accuracy against evaluation length per model (one
  panel per task), accuracy against d_model (Zoology's figure-2 shape, one panel per task), the training loss
  curves, and throughput and peak-memory bars.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from chimera.errors import UserError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(ax, xlabel: str, ylabel: str, title: str, legend: bool = True) -> None:
    """Every panel's axes, title, grid (and legend)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_runs(run_dirs: list[str], out: str | Path) -> Path:
    """One PNG of the runs' ``loss``, ``val_loss`` and ``tokens_per_s`` curves (panels without data are dropped)."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {str(out)!r}: the figure is a PNG; name it *.png")
    curves = {}
    for d in run_dirs:
        path = Path(d) / "metrics.jsonl"
        if not path.is_file():
            raise UserError(f"{d!r} has no metrics.jsonl; pass run directories of trained runs")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows:
            raise UserError(f"{path} is empty; the run has not logged a step yet")
        curves[str(d)] = rows
    panels = [k for k in ("loss", "val_loss", "tokens_per_s") if any(k in r for rows in curves.values() for r in rows)]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for name, rows in curves.items():
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=Path(name).name)
        _label(ax, "step", key, key, legend=False)
    axes[0][0].legend(fontsize=7)
    return _save(fig, out)


def _by_task(runs: list[dict]) -> dict[str, list[dict]]:
    tasks = defaultdict(list)
    for r in runs:
        tasks[r["task"]].append(r)
    return tasks


def length_curve(run: dict) -> list[tuple[int, float]]:
    """A run's ``(length, accuracy)`` points: its long-context curve, else the Chomsky test lengths, else the MQAR
    grid's lengths (accuracy averaged over its key-value counts)."""
    points = [(row["length"], row["accuracy"]) for row in run["longctx"] if row["accuracy"] is not None]
    if not points and "chomsky" in run["eval"]:
        points = [(row["length"], row["accuracy"]) for rows in run["eval"]["chomsky"]["per_length"].values()
                  for row in rows]
    if not points and "mqar" in run["eval"]:
        cells = defaultdict(list)
        for row in run["eval"]["mqar"]["rows"]:
            cells[row["seq_len"]].append(row["accuracy"])
        points = [(k, sum(v) / len(v)) for k, v in cells.items()]
    return sorted(points)


def plot_experiment(results: dict, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    runs = results["runs"]
    plt = _pyplot()
    written = []
    tasks = _by_task(runs)

    # accuracy vs evaluation length (length_curve), one line per model
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, (task, rs) in zip(axes[0], tasks.items()):
        for r in rs:
            points = length_curve(r)
            if points:
                ax.plot(*zip(*sorted(points)), marker="o", label=f"{r['model']} lr {r['lr']:g} s{r['seed']}")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        _label(ax, "evaluation length (tokens)", "accuracy", task)
    written.append(_save(fig, out_dir / "accuracy_vs_length.png"))

    # accuracy vs d_model, one line per model entry (the best lr per width, as Zoology does)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, (task, rs) in zip(axes[0], tasks.items()):
        lines = defaultdict(dict)
        for r in rs:
            if r["accuracy"] is not None:
                best = lines[r.get("model_entry", r["model"])]
                best[r["d_model"]] = max(best.get(r["d_model"], 0.0), r["accuracy"])
        for name, points in lines.items():
            ax.plot(*zip(*sorted(points.items())), marker="o", label=name)
        ax.set_ylim(-0.02, 1.02)
        _label(ax, "d_model", "accuracy (best lr)", task)
    written.append(_save(fig, out_dir / "accuracy_vs_d_model.png"))

    # training loss curves, one panel per task
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, (task, rs) in zip(axes[0], tasks.items()):
        for r in rs:
            ax.plot(*zip(*r["loss_curve"]), label=f"{r['model']} lr {r['lr']:g} s{r['seed']}")
        _label(ax, "step", "training loss", task)
    written.append(_save(fig, out_dir / "loss_curves.png"))

    # throughput and peak memory per model (median over its runs)
    per_model = defaultdict(lambda: {"tps": [], "mem": []})
    for r in runs:
        per_model[r["model"]]["tps"].append(r["throughput_tokens_per_s"])
        if r["peak_memory_mb"] is not None:
            per_model[r["model"]]["mem"].append(r["peak_memory_mb"])
    names = list(per_model)
    median = lambda xs: sorted(xs)[len(xs) // 2] if xs else 0.0  # noqa: E731
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(names) * 2), 3.6))
    axes[0].bar(names, [median(per_model[n]["tps"]) for n in names], color="tab:blue")
    axes[0].set_ylabel("training tokens / s (median)")
    axes[1].bar(names, [median(per_model[n]["mem"]) for n in names], color="tab:orange")
    axes[1].set_ylabel("peak memory MB (median)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    written.append(_save(fig, out_dir / "throughput_memory.png"))
    return written
