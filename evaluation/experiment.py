"""An architecture-benchmark experiment file (``chimera bench-arch EXPERIMENT.yaml``), validated.

It lists models (a preset, model-field overrides, and how wide: ``d_model`` values, ``target_params`` counts the
width is solved for, or ``match: NAME`` for the count of another model), tasks (a synthetic task, its options,
and the eval suites run after training), the token budget of each run (reduced by default, ``full_tokens`` with
``--full-budget``), the learning-rate sweep and the seeds. Every (model variant, task, lr, seed) is one run.
One vocabulary for all models (``vocab_size``, default: the largest any task needs), so a model's parameter count
is the same on every task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from chimera.configs.section import Section
from chimera.errors import UserError
from chimera.evaluation.names import SUITE_NAMES


class ModelEntry(Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    preset: str
    overrides: dict[str, Any] = Field(default_factory=dict, description="model fields set on the preset")
    d_model: int | list[int] | None = Field(None, description="width(s) used as given")
    target_params: int | list[int] | None = Field(None, description="parameter count(s) the width is solved for")
    match: str | None = Field(None, description="solve the width for the count of this other model (one width)")

    @model_validator(mode="after")
    def _one_width_rule(self):
        given = [k for k in ("d_model", "target_params", "match") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of d_model, target_params, match (got {', '.join(given)})")
        if "d_model" in self.overrides or "vocab_size" in self.overrides:
            raise ValueError("set d_model with the d_model field and the vocabulary with the experiment's vocab_size")
        return self


class TaskEntry(Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    task: str = Field(..., description="a synthetic task: mqar or a Chomsky task")
    options: dict[str, Any] = Field(default_factory=dict, description="the task's constructor arguments")
    seq_len: int | None = Field(None, ge=2, description="training length (default: what the task needs)")
    eval: dict[str, dict[str, Any]] = Field(default_factory=dict, description="suite -> its options")
    tokens: int | None = Field(None, ge=1, description="this task's reduced budget (default: budget.tokens)")
    full_tokens: int | None = Field(None, ge=1, description="this task's full budget (default: budget.full_tokens)")

    @model_validator(mode="after")
    def _known_suites(self):
        unknown = [s for s in self.eval if s not in SUITE_NAMES]
        if unknown:
            raise ValueError(f"unknown eval suite {unknown[0]!r}; choose from {', '.join(SUITE_NAMES)}")
        return self


class Budget(Section):
    tokens: int = Field(..., ge=1, description="training tokens per run (the reduced budget)")
    full_tokens: int = Field(..., ge=1, description="training tokens per run with --full-budget")


class Experiment(Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    models: list[ModelEntry] = Field(..., min_length=1)
    tasks: list[TaskEntry] = Field(..., min_length=1)
    vocab_size: int | None = Field(None, ge=2, description="every model's vocabulary (default: the largest task's)")
    budget: Budget
    lrs: list[float] = Field(default_factory=lambda: [3e-3], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    train: dict[str, Any] = Field(default_factory=dict, description="train: fields shared by every run (not steps "
                                  "or lr)")

    @model_validator(mode="after")
    def _names(self):
        for what, names in (("model", [m.name for m in self.models]), ("task", [t.name for t in self.tasks])):
            if len(set(names)) != len(names):
                raise ValueError(f"{what} names must be unique, got {names}")
        known = {m.name for m in self.models}
        for m in self.models:
            if m.match is not None and (m.match not in known or m.match == m.name):
                raise ValueError(f"model {m.name}: match {m.match!r} is not another model of the experiment")
        bad = {"steps", "lr", "min_lr", "seed"} & set(self.train)
        if bad:
            raise ValueError(f"train: {sorted(bad)} are set per run (budget, lrs, seeds); remove them")
        return self


@dataclass
class Variant:
    """One model of the sweep: a name, its preset and the model fields (width and vocabulary included)."""

    name: str
    entry: str  # the experiment's model name
    preset: str
    fields: dict
    d_model: int
    parameters: int


@dataclass
class RunSpec:
    variant: Variant
    task: TaskEntry
    lr: float
    seed: int
    steps: int
    seq_len: int

    @property
    def key(self) -> str:
        return f"{self.variant.name}/{self.task.name}/lr{self.lr:g}-seed{self.seed}"


def load_experiment(path: str | Path) -> Experiment:
    from chimera.configs.loader import _read_yaml, validated

    return validated(Experiment, _read_yaml(path), prefix=f"{path}: ")


def task_of(entry: TaskEntry, seq_len: int | None = None):
    """The training task of ``entry`` (its seq_len: the entry's, else what the task needs)."""
    from chimera.data.synthetic import make_task

    options = dict(entry.options)
    length = seq_len or entry.seq_len
    if length is not None:
        options["seq_len"] = length
    try:
        return make_task(entry.task, **options)
    except (TypeError, ValueError) as e:
        raise UserError(f"task {entry.name}: {e}") from None


def resolve_vocab(exp: Experiment) -> int:
    needed = {t.name: task_of(t).vocab_size for t in exp.tasks}
    if exp.vocab_size is None:
        return max(needed.values())
    too_big = {n: v for n, v in needed.items() if v > exp.vocab_size}
    if too_big:
        name, v = next(iter(too_big.items()))
        raise UserError(f"task {name} needs {v} token ids but the experiment's vocab_size is {exp.vocab_size}: the "
                        f"models' vocabulary cannot hold it; raise vocab_size to >= {v} or shrink the task's vocab")
    return exp.vocab_size


def variants(exp: Experiment) -> list[Variant]:
    """Every model variant, widths solved; models with ``match`` after the ones they match."""
    from chimera.configs.loader import load_preset
    from chimera.evaluation.width import count_parameters, solve_width

    vocab = resolve_vocab(exp)
    out: list[Variant] = []
    by_name: dict[str, Variant] = {}
    order = [m for m in exp.models if m.match is None] + [m for m in exp.models if m.match is not None]
    for m in order:
        load_preset(m.preset)  # an unknown preset: one line naming it
        base = {**m.overrides, "vocab_size": vocab}
        if m.d_model is not None or (m.target_params is None and m.match is None):
            widths = m.d_model if isinstance(m.d_model, list) else [m.d_model]
            for d in widths:
                fields = base if d is None else {**base, "d_model": d}
                n = count_parameters(m.preset, fields)
                if n is None:
                    from chimera.configs.loader import load_model_config

                    load_model_config(m.preset, [f"{k}={v}" for k, v in fields.items()])  # raises, naming the field
                width = d or load_preset(m.preset)["d_model"]
                name = m.name if len(widths) == 1 else f"{m.name}-d{width}"
                out.append(Variant(name, m.name, m.preset, fields, width, n))
        else:
            targets = [by_name[m.match].parameters] if m.match else (
                m.target_params if isinstance(m.target_params, list) else [m.target_params])
            for target in targets:
                w = solve_width(m.preset, target, base)
                name = m.name if len(targets) == 1 else f"{m.name}-{target}"
                out.append(Variant(name, m.name, m.preset, w.overrides, w.d_model, w.parameters))
        by_name[m.name] = out[-1]
    return out


def run_specs(exp: Experiment, full_budget: bool = False) -> list[RunSpec]:
    specs = []
    batch = int(exp.train.get("global_batch_size", 8))
    for variant in variants(exp):
        for task in exp.tasks:
            seq_len = task_of(task).seq_len
            tokens = (task.full_tokens or exp.budget.full_tokens) if full_budget else (task.tokens or exp.budget.tokens)
            steps = max(1, tokens // (batch * seq_len))
            for lr in exp.lrs:
                for seed in exp.seeds:
                    specs.append(RunSpec(variant, task, lr, seed, steps, seq_len))
    return specs


def run_config(spec: RunSpec, exp: Experiment):
    """The validated ``RunConfig`` of one run."""
    from chimera.configs.loader import _resolve_model, validated
    from chimera.configs.schema import RunConfig

    train = {"micro_batch_size": 8, "global_batch_size": 8, "eval_every": 0, "log_every": 1, **exp.train,
             "steps": spec.steps, "lr": spec.lr, "seed": spec.seed}
    train.setdefault("min_lr", min(spec.lr, spec.lr / 10))
    train["warmup_steps"] = min(int(train.get("warmup_steps", max(1, spec.steps // 10))), spec.steps)
    options = {k: v for k, v in spec.task.options.items() if k != "seq_len"}
    data = {"seq_len": spec.seq_len, "seed": 1000 + spec.seed,
            "sources": [{"type": "synthetic", "name": spec.task.name, "task": spec.task.task, "options": options}]}
    raw = {"model": {"preset": spec.variant.preset, **spec.variant.fields, "name": spec.variant.name},
           "data": data, "train": train, "checkpoint": {"every": 0, "keep": 1},
           "logging": {"wandb": "disabled", "progress": False, "rank_stats_every": 0}}
    return validated(RunConfig, _resolve_model(raw), prefix=f"run {spec.key}: ")
