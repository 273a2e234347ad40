"""Resuming a run: from which checkpoint, with which changes, and one trajectory in its records.

A run directory belongs to one run. Re-running its command resumes it from its newest valid checkpoint
(``chimera.trainer.checkpoint``), and what the command may change is decided here, field by field:

* **refused** (one line naming the fields, exit 2, nothing written): the model (any field; a renamed preset or
  ``|`` stage marks aside; a run starting from a weights-only checkpoint, as ``import-hf`` writes, may change the
  model fields that keep every parameter's name and shape, e.g. a converted model's routing), the tokenizer, the
  data seed and the validation split (they fix which document comes next: changing them would repeat or skip
  data);
* **allowed and said** (one line when the run resumes, and an event): the layout (``parallel``), the data sources
  and their weights (the cursors of the sources continue), the sequence length and curriculum, the batch size, the
  learning rate and its bounds, and ``train.steps``, with this schedule rule: from the update where the run
  resumes, the rate falls from what it was there to ``min_lr`` at the new last step (``ScheduleAnchor``: no jump;
  a change during warmup simply re-lays the cosine);
* **quiet**: logging, checkpointing, launching, validation cadence, ``stop_after`` and fault injection.

Records stay one trajectory: when a run resumes from step ``k``, the rows of ``metrics.jsonl`` and
``samples.jsonl`` after ``k`` (written by the interrupted attempt, and about to be written again) move to
``metrics.superseded.jsonl`` / ``samples.superseded.jsonl``, and ``events.jsonl`` says so.

``--restart`` starts a run afresh in a directory that has one: the old checkpoints and records move to
``RUN_DIR/restarted/N/`` (nothing is deleted). ``--resume-from STEP`` resumes from an older checkpoint: the
newer ones move to ``RUN_DIR/superseded/`` so that nothing can resume from the abandoned trajectory.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from chimera.configs.schema import RunConfig
from chimera.errors import UserError
from chimera.trainer import events
from chimera.trainer.checkpoint import (
    CHECKPOINTS,
    CheckpointProblem,
    is_weights_only,
    latest_checkpoint,
    problem,
    read_config,
    step_dirs,
    step_of,
    step_tag,
)
from chimera.trainer.metrics import MFU_BASIS
from chimera.trainer.optim import ScheduleAnchor, lr_at

RECORDS = ("metrics.jsonl", "samples.jsonl")
REFUSED = {
    "data.tokenizer": "the data's tokens",
    "data.seed": "the order of the documents",
    "data.val_fraction": "which documents are training data",
}
SAID = {
    "parallel": "a new layout",
    "data.sources": "new data sources or weights (each source's cursor continues)",
    "data.seq_len": "a new sequence length",
    "data.curriculum": "a new curriculum",
    "data.packing": "a new packing",
    "train.global_batch_size": "a new batch size (the data cursor continues)",
    "train.micro_batch_size": "a new micro-batch size",
}
QUIET = ("logging", "checkpoint", "launch", "train.stop_after", "train.eval_every", "train.eval_batches",
         "train.log_every", "train.fault_injection")


def model_key(cfg) -> dict:
    """What makes two model configs the same model: every field but the name, the preset and ``|`` stage marks."""
    data = cfg.model_dump(exclude={"name", "preset"})
    data["pattern"] = data["pattern"].replace("|", "")
    return data


def same_model(a, b) -> bool:
    return model_key(a) == model_key(b)


def start_from_weights(path: Path, saved: RunConfig, state: dict, current: RunConfig) -> list[str]:
    """The model fields a run starting from weights-only checkpoint ``path`` (e.g. ``chimera import-hf``) changes.
    Any field may change that keeps every parameter's name and shape (a converted model's routing, say); a change
    that does not is refused (one line)."""
    if same_model(saved.model, current.model):
        return []
    from chimera.models.causal_lm import meta_model

    if meta_model(saved.model).full_shapes() != meta_model(current.model).full_shapes():
        raise refusal(path, compare(saved, state, current))
    theirs, ours = model_key(saved.model), model_key(current.model)
    return [f"model.{k}" for k in sorted(ours) if ours[k] != theirs.get(k)]


def _flatten(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def _covered(path: str, prefixes) -> str | None:
    return next((p for p in prefixes if path == p or path.startswith(p + ".")), None)


@dataclass
class Changes:
    refused: list[str]  # field paths
    said: list[str]  # one phrase each, for the resume line
    anchor: ScheduleAnchor | None  # set when train.steps changed after warmup


def compare(saved: RunConfig, saved_state: dict, current: RunConfig) -> Changes:
    """How ``current`` differs from the config a checkpoint was written with (``saved``, with its trainer state)."""
    if not same_model(saved.model, current.model):
        theirs, ours = model_key(saved.model), model_key(current.model)
        return Changes([f"model.{k}" for k in sorted(ours) if ours[k] != theirs.get(k)], [], None)
    old, new = _flatten(saved.model_dump(mode="json", exclude={"model"})), \
        _flatten(current.model_dump(mode="json", exclude={"model"}))
    refused, said, seen = [], [], set()
    anchor = _anchor(saved_state)
    for path in sorted(set(old) | set(new)):
        if old.get(path) == new.get(path) or _covered(path, QUIET):
            continue
        if _covered(path, REFUSED):
            refused.append(path)
            continue
        group = _covered(path, SAID)
        if group:
            if group not in seen:
                seen.add(group)
                said.append(f"{group} changed: {SAID[group]}")
            continue
        if path == "train.steps":
            anchor, rule = _relaid(saved, saved_state, current, anchor)
            said.append(f"train.steps {old[path]} -> {new[path]} ({rule})")
        else:
            said.append(f"{path} {old.get(path)!r} -> {new.get(path)!r}")
    return Changes(refused, said, anchor)


def _anchor(state: dict) -> ScheduleAnchor | None:
    a = state.get("schedule_anchor")
    return None if a is None else ScheduleAnchor(int(a["step"]), float(a["lr"]))


def _relaid(saved: RunConfig, state: dict, current: RunConfig, anchor: ScheduleAnchor | None):
    """The schedule after ``train.steps`` changed at a resume: (anchor, the rule in words)."""
    update = int(state.get("optimizer_steps", state.get("step", 0)))
    if update < current.train.warmup_steps:
        return None, "still warming up: the cosine is laid over the new total"
    rate = lr_at(update, saved.train, anchor)
    return ScheduleAnchor(update, rate), (f"the learning rate goes on from {rate:.3g} at update {update} down to "
                                         f"min_lr at the new last step")


def refusal(path: Path, changes: Changes) -> UserError:
    return UserError(f"the run's checkpoint {path} was written with another {', '.join(changes.refused)}; "
                     f"resume with the run's own settings (its config.yaml), or use another --run-dir (or --restart "
                     "to start this one afresh)")


# ---- the run directory ------------------------------------------------------------------------------------


def check_writable(run_dir: str | Path) -> Path:
    """The run directory, created if needed; one line if it cannot be written (before any model is built)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {str(run_dir)!r} exists and is not a directory")
    probe = run_dir / ".chimera-write-test"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--run-dir {str(run_dir)!r} cannot be written ({e.strerror or e}); choose a writable "
                        "directory") from None
    return run_dir


def has_run(run_dir: Path) -> bool:
    return bool(step_dirs(run_dir)) or (run_dir / CHECKPOINTS / "latest").exists()


def archive_for_restart(run_dir: Path) -> Path | None:
    """Move a run's checkpoints and records out of the way (``RUN_DIR/restarted/N/``); the directory, or None."""
    names = [CHECKPOINTS, *RECORDS, *(f"{Path(r).stem}.superseded.jsonl" for r in RECORDS), "events.jsonl",
             "config.yaml", events.SKIP_FILE, "superseded", "stacks", MFU_BASIS]
    present = [n for n in names if (run_dir / n).exists()]
    if not present:
        return None
    restarted = run_dir / "restarted"
    n = 1 + max((int(p.name) for p in restarted.glob("*") if p.name.isdigit()), default=0)
    target = restarted / str(n)
    target.mkdir(parents=True)
    for name in present:
        os.replace(run_dir / name, target / name)
    events.record(run_dir, "restart", archived=str(target.relative_to(run_dir)))
    return target


def set_aside_after(run_dir: Path, step: int) -> list[str]:
    """``--resume-from STEP``: the checkpoints newer than ``step`` move to ``RUN_DIR/superseded/``."""
    target = run_dir / "superseded"
    moved = []
    for path in step_dirs(run_dir):
        if step_of(path) > step:
            target.mkdir(exist_ok=True)
            dest = target / path.name
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(path, dest)
            moved.append(path.name)
    (run_dir / CHECKPOINTS / "latest").unlink(missing_ok=True)
    if moved:
        events.record(run_dir, "resume_from", step=step, set_aside=moved)
    return moved


def supersede(run_dir: Path, step: int) -> int:
    """Move the record rows after ``step`` to their ``.superseded.jsonl`` files; how many metrics rows moved."""
    moved_metrics = 0
    for name in RECORDS:
        path = run_dir / name
        if not path.is_file():
            continue
        keep, gone = [], []
        for line in path.read_text().splitlines():
            try:
                row_step = json.loads(line).get("step", 0)
            except json.JSONDecodeError:
                continue  # a row cut short by a crash
            (gone if row_step > step else keep).append(line)
        if gone:
            with open(run_dir / f"{Path(name).stem}.superseded.jsonl", "a") as f:
                f.write("".join(line + "\n" for line in gone))
        if gone or len(keep) != len(path.read_text().splitlines()):
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, path)
        if name == "metrics.jsonl":
            moved_metrics = len(gone)
    return moved_metrics


# ---- before any process starts ----------------------------------------------------------------------------


@dataclass
class Resume:
    checkpoint: Path | None  # the newest whole checkpoint (the ranks check its checksums), or None: from scratch
    step: int
    finished: bool  # it is at train.steps already
    changes: Changes | None


def prepare(run_dir: str | Path, cfg: RunConfig, restart: bool = False, resume_from: int | None = None,
            say=print) -> Resume:
    """What ``chimera train`` does with an existing run directory, checked once before any rank starts: refuse what
    cannot continue (exit 2, nothing changed), say what changes, find where it resumes."""
    run_dir = check_writable(run_dir)
    if restart:
        archived = archive_for_restart(run_dir)
        if archived:
            say(f"chimera: --restart: the previous run's checkpoints and records moved to {archived}")
        return Resume(None, 0, False, None)
    if resume_from is not None:
        path = run_dir / CHECKPOINTS / step_tag(resume_from)
        if not path.is_dir():
            have = ", ".join(str(step_of(p)) for p in step_dirs(run_dir)) or "none"
            raise UserError(f"--resume-from {resume_from}: {run_dir} has no checkpoint of that step (it has: {have})")
        why = problem(path)
        if why is not None:
            raise UserError(f"--resume-from {resume_from}: checkpoint {path} is not valid: {why}")
    else:
        path = latest_checkpoint(run_dir, report=lambda line: say(f"chimera: {line}"))
    if path is None:
        pointer = run_dir / CHECKPOINTS / "latest"
        if pointer.exists():  # a run was here, its checkpoints are gone: never start afresh over it unasked
            raise UserError(f"{pointer} names {pointer.read_text().strip()!r}, which is missing, and there is no other "
                            "checkpoint to resume from; restore it, or start this run afresh with --restart")
        return Resume(None, 0, False, None)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        saved = read_config(path)
    except (OSError, ValueError, CheckpointProblem) as e:
        raise UserError(f"checkpoint {path} cannot be read ({e}); move it away to resume from an older one") from None
    if is_weights_only(path):  # e.g. from `chimera import-hf`: only the parameters must match
        changed = start_from_weights(path, saved, state, cfg)
        if changed:
            say(f"chimera: starting from the weights of {path} with model changes: {', '.join(changed)}")
        return Resume(path, 0, False, None)
    changes = compare(saved, state, cfg)
    if changes.refused:
        raise refusal(path, changes)
    step = int(state["step"])
    finished = step >= cfg.train.steps and problem(path) is None
    if resume_from is not None:
        set_aside_after(run_dir, resume_from)
    if changes.said and not finished:
        say(f"chimera: resuming {run_dir} at step {step} with changes: " + "; ".join(changes.said))
    return Resume(path, step, finished, changes)
