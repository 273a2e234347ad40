"""Checkpoints: save, find, verify, resume (on any layout); and loading a model for inference.

A checkpoint is one directory ``RUN_DIR/checkpoints/step_XXXXXXXX/`` holding

* ``tensors/``: a layout-free store of logical tensors (``chimera.trainer.tensor_store``, zarr): for every
  parameter its full fp32 master weights ``model/NAME`` and AdamW moments ``exp_avg/NAME``,
  ``exp_avg_sq/NAME``, as full (unsharded) tensors whatever the layout that wrote them;
* ``trainer_state.json``: step, optimizer steps, the data loader's state (a few cursors), the layout;
* ``config.yaml``: the resolved run config, ``rng/rank_*.json``: every rank's RNG states;
* ``manifest/rank_*.json`` and ``MANIFEST.json``: size and sha256 of every file.

Nothing in a checkpoint is a pickle: JSON, YAML and zarr arrays only, so loading one executes no code.

**Saving** is parallel and never gathers: each rank writes the fragments of master weights and moments it
holds (``chimera.trainer.optimizer_state``; a tensor-parallel shard, a ZeRO partition of it) to its own
files of the store and hashes only those; replicas (tensor-parallel copies, tied pipeline copies, the
data-parallel copies without ZeRO) are written once. Rank 0 merges the ranks' manifests. The directory
is written under a temporary name and renamed when complete; ``checkpoints/latest`` (replaced
atomically) names the newest one. A crash mid-save leaves the previous checkpoint intact; a save the file
system refuses is reported and retried at the next interval, training goes on (``Checkpointer``).

**Finding one** does not trust ``latest``: the newest checkpoint whose files all match the manifest (sizes,
and sha256 checked by all ranks together) is used; each newer one that fails is skipped with one line saying
why (truncated, altered, deleted file, no manifest, unreadable state). A run with checkpoints but no valid one
is refused (exit 2), never silently started afresh.

**Resuming** reads only what a rank holds in the new layout: its shard of each weight (when building the
model), and the fragments of master weights and moments of its partition, from whichever files hold them.
So a run resumes under any (TP, PP, CP, EP, DP, ZeRO) layout with the same ``chimera train`` command;
the data position is layout-free already, the learning-rate schedule a function of the step. RNG states
are restored when the layout is the one that wrote them (training draws no random numbers today).
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from chimera.checksums import sha256_file
from chimera.configs.schema import ModelConfig, RunConfig
from chimera.errors import UserError
from chimera.trainer.tensor_store import StoreReader, StoreWriter, write_shapes

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "trainer_state.json"
MANIFEST = "MANIFEST.json"
TENSORS = "tensors"
CONFIG = "config.yaml"
WEIGHTS = "model"  # the kind of the master weights in the store: model/NAME
MOMENTS = ("exp_avg", "exp_avg_sq")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _hashes(root: Path, files) -> dict:
    return {str(Path(f).relative_to(root)): {"bytes": Path(f).stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(map(str, files))}


def _write_manifest(path: Path) -> None:
    """Every file of a checkpoint written by one process: hashed here."""
    files = [p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST]
    (path / MANIFEST).write_text(json.dumps({"files": _hashes(path, files)}, indent=1))


def is_weights_only(path: Path) -> bool:
    return _read_json(path / STATE).get("weights_only", False)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointProblem(f"{path.name} is unreadable ({e.__class__.__name__}: {e})") from None


class CheckpointProblem(Exception):
    """What is wrong with one checkpoint (the run may still resume from an older one)."""


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def step_dirs(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint directories (complete names, not the temporary ones of a save), newest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name.removeprefix("step_").isdigit()]
    return sorted(found, key=step_of, reverse=True)


def problem(path: Path, share: int = 0, of: int = 1, checksums: bool = True) -> str | None:
    """Why ``path`` cannot be resumed from, or None: a missing or unreadable manifest or trainer state, a missing,
    truncated or altered file (``checksums``: this process's ``share`` of ``of`` equal parts of the files are hashed,
    so that ranks verify a checkpoint together; without, only sizes are checked)."""
    try:
        if not (path / MANIFEST).is_file():
            return f"its {MANIFEST} is missing (an interrupted save, or a partial copy)"
        manifest = _read_json(path / MANIFEST)
        _read_json(path / STATE)
        files = sorted(manifest["files"].items())
    except CheckpointProblem as e:
        return str(e)
    except (KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} is not a checkpoint manifest"
    for i, (rel, meta) in enumerate(files):
        f = path / rel
        if not f.is_file():
            return f"file {rel} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"file {rel} has {f.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated?)"
        if checksums and i % of == share and sha256_file(f) != meta["sha256"]:
            return f"file {rel} does not match its checksum (altered or corrupt)"
    return None


def latest_checkpoint(run_dir: str | Path, report=None) -> Path | None:
    """The newest checkpoint of a run directory that is whole (every file of its manifest, at its size), or None
    when the run has none. ``checkpoints/latest`` is only a hint: a dangling or stale pointer is reported (through
    ``report``, a function taking one line) and the newest whole checkpoint is used."""
    candidates = step_dirs(run_dir)
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if pointer.is_file() and report is not None:
        named = pointer.read_text().strip()
        if not (pointer.parent / named).is_dir():
            report(f"{pointer} names {named!r}, which does not exist; looking for the newest whole checkpoint")
    for path in candidates:
        why = problem(path, checksums=False)
        if why is None:
            return path
        if report is not None:
            report(f"checkpoint {path} skipped: {why}")
    if candidates:
        raise UserError(f"no usable checkpoint in {Path(run_dir) / CHECKPOINTS} (newest: {candidates[0].name}: "
                        f"{problem(candidates[0], checksums=False)}); repair or move them away, or start afresh "
                        "with --restart (the old files are kept)")
    return None


def resolve_checkpoint(path: str | Path, report=None) -> Path:
    """A checkpoint directory, or a run directory's newest valid checkpoint (every checksum checked; an invalid one
    is reported and the one before it tried)."""
    path = Path(path)
    if (path / STATE).is_file():
        return path
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist; pass a run directory or a checkpoint directory")
    report = report or (lambda line: print(f"chimera: {line}", file=sys.stderr))
    candidates = step_dirs(path)
    for ckpt in candidates:
        why = problem(ckpt)
        if why is None:
            return ckpt
        report(f"checkpoint {ckpt} skipped: {why}")
    if candidates:
        raise UserError(f"no valid checkpoint in {path / CHECKPOINTS}; every one failed its check (see above)")
    raise UserError(f"{str(path)!r} holds no checkpoint (no {CHECKPOINTS}/step_*); train first or pass a checkpoint")


def verify(path: Path, share: int = 0, of: int = 1) -> dict:
    """Check the files against the manifest (this process's ``share`` of ``of`` equal parts of them); return the
    trainer state. A problem is a ``UserError`` naming it."""
    why = problem(path, share, of)
    if why is not None:
        raise UserError(f"checkpoint {path}: {why}; resume from an older one (delete this one or move it away)")
    return _read_json(path / STATE)


def _problem_together(path: Path) -> str | None:
    """``problem`` with every rank hashing its share of the files; the first problem any rank found, on every rank."""
    why = problem(path, dist.get_rank(), dist.get_world_size())
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, why)
    return next((p for p in problems if p), None)


def verify_together(path: Path) -> dict:
    """``verify``, the files hashed by all ranks together; a problem is a ``UserError`` on every rank."""
    why = _problem_together(path)
    if why is not None:
        raise UserError(f"checkpoint {path}: {why}; resume from an older one (delete this one or move it away)")
    return _read_json(path / STATE)


def newest_valid_together(candidates: list[Path], report) -> Path | None:
    """The first of ``candidates`` (newest first) whose every file and checksum holds, checked by all ranks together;
    each one skipped is reported (``report(line)``, on every rank). None when none holds."""
    for path in candidates:
        why = _problem_together(path)
        if why is None:
            return path
        report(f"checkpoint {path} skipped: {why}")
    return None


def read_config(path: Path) -> RunConfig:
    try:
        return RunConfig.model_validate(yaml.safe_load((path / CONFIG).read_text()))
    except (OSError, yaml.YAMLError, ValueError) as e:
        raise CheckpointProblem(f"{CONFIG} of {path} is unreadable ({e.__class__.__name__})") from None


def weights_reader(path: Path) -> StoreReader:
    """The store of a checkpoint; ``model/NAME`` holds each parameter's full weights."""
    return StoreReader(path / TENSORS)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 weights, by name (inference, export)."""
    reader = weights_reader(path)
    prefix = f"{WEIGHTS}/"
    return {n[len(prefix):]: reader.read(n) for n in reader.names() if n.startswith(prefix)}


def _failure(error: BaseException) -> bool:
    """Whether ``error`` is the file system's (a full disk, a permission, a vanished directory), through any chain of
    exceptions a library wrapped it in."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Checkpointer:
    """Saves and restores a run's checkpoints; every method is collective over all ranks.

    A save that the file system refuses on any rank (disk full, permission denied, the directory gone) does not stop
    training: its temporary directory is removed, the previous checkpoints stay as they were, ``failures`` counts it
    and the next save tries again. With ``asynchronous``, a save snapshots what each rank holds into host memory and a
    background thread writes it while training goes on; ``poll`` (every step) completes it once every rank's thread
    is done, ``wait`` before the run ends."""

    def __init__(self, run_dir: str | Path, keep: int, rank: int, asynchronous: bool = False, report=print):
        self.root = Path(run_dir) / CHECKPOINTS
        self.keep, self.rank, self.asynchronous = keep, rank, asynchronous
        self.report = report  # one line, rank 0 only
        self.failures = 0
        self.last_saved: int | None = None  # step of the newest checkpoint this run completed
        self._pending: _BackgroundSave | None = None
        if rank == 0:  # what a crashed save left behind (no save of this run is under way yet)
            for stale in self.root.glob(".tmp_step_*"):
                shutil.rmtree(stale, ignore_errors=True)

    # ---- saving ---------------------------------------------------------------------------------------

    def save(self, engine, cfg: RunConfig, state: dict) -> Path | None:
        """Every rank writes what it holds (``engine.pieces()``); rank 0 the shapes, config and state. Returns the
        checkpoint (asynchronously: where it will be), or None when the save failed."""
        self.wait()  # one save at a time
        step = state["step"]
        final, tmp = self.root / step_tag(step), self.root / f".tmp_{step_tag(step)}"
        error = self._agree(self._guard(lambda: self._prepare(tmp)))
        if error:
            return self._failed(step, error, tmp)
        pieces = list(engine.pieces())
        shapes = {f"{kind}/{name}": list(shape) for name, shape in engine.full_shapes().items()
                  for kind in (WEIGHTS, *MOMENTS)}
        texts = {CONFIG: yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
                 STATE: json.dumps({**state, "optimizer_steps": engine.optimizer_steps()}, indent=1)}
        if self.asynchronous:  # a snapshot in host memory: training may change the tensors from the next step on
            pieces = [(n, box, a, b, {k: t.detach().to("cpu", copy=True) for k, t in ts.items()})
                      for n, box, a, b, ts in pieces]
            self._pending = _BackgroundSave(self, step, tmp, final, pieces, shapes, texts)
            return final
        error = self._agree(self._guard(lambda: self._write(tmp, pieces, shapes, texts)))
        return self._complete(step, tmp, final, error)

    def poll(self, done_everywhere: bool | None = None) -> None:
        """Complete a background save once every rank has written its part (collective: call on every rank at the
        same step; ``done_everywhere``: whether every rank's writer is done, when the caller already agreed on it)."""
        if self._pending is None:
            return
        if done_everywhere is None:
            done_everywhere = self._all(self._pending.done())
        if done_everywhere:
            pending, self._pending = self._pending, None
            self._complete(pending.step, pending.tmp, pending.final, self._agree(pending.join()))

    def pending_done(self) -> bool:
        """Whether no background save is running on this rank (a save pending completion counts as done)."""
        return self._pending is None or self._pending.done()

    def wait(self) -> None:
        """Finish a background save (collective)."""
        if self._pending is not None:
            self._pending.join()
            self.poll(done_everywhere=True)

    def _prepare(self, tmp: Path) -> None:
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / TENSORS).mkdir(parents=True)
            (tmp / "rng").mkdir()
            (tmp / "manifest").mkdir()

    def _write(self, tmp: Path, pieces, shapes: dict, texts: dict) -> None:
        """This rank's files and their hashes (its part of the manifest)."""
        total = sum((stop - start) * len(tensors) for _, _, start, stop, tensors in pieces)
        # zarr writes its last chunk whole: no chunk larger than what this rank holds
        writer = StoreWriter(tmp / TENSORS, self.rank, chunk_elements=max(1, min(1 << 22, total)))
        for name, box, start, stop, tensors in pieces:
            for kind, t in tensors.items():
                writer.add(f"{kind}/{name}", box, start, stop, t)
        files = writer.close()
        rng = tmp / "rng" / f"rank_{self.rank:05d}.json"
        rng.write_text(json.dumps(_rng_state()))
        files.append(rng)
        if self.rank == 0:
            files.append(write_shapes(tmp / TENSORS, shapes))
            for name, text in texts.items():
                (tmp / name).write_text(text)
                files.append(tmp / name)
        (tmp / "manifest" / f"rank_{self.rank:05d}.json").write_text(json.dumps(_hashes(tmp, files)))

    def _complete(self, step: int, tmp: Path, final: Path, error: str | None) -> Path | None:
        """Rank 0 merges the ranks' manifests and renames the checkpoint into place (collective)."""
        if error:
            return self._failed(step, error, tmp)
        error = self._agree(self._guard(lambda: self._publish(tmp, final)))
        if error:
            return self._failed(step, error, tmp)
        self.last_saved = step
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        if self.rank != 0:
            return
        merged = {}
        for part in sorted((tmp / "manifest").glob("rank_*.json")):
            merged.update(json.loads(part.read_text()))
        (tmp / MANIFEST).write_text(json.dumps({"files": merged}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(self.root / LATEST, final.name)
        self._prune()

    def _failed(self, step: int, error: str, tmp: Path) -> None:
        self.failures += 1
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            self.report(f"chimera: checkpoint at step {step} not saved ({error}); training continues and the next "
                        "save tries again")
        return None

    def _guard(self, write) -> str | None:
        """Run ``write``; a file-system failure becomes its one-line description (other errors are bugs: raised)."""
        try:
            write()
            return None
        except Exception as e:
            if not _failure(e):
                raise
            return f"rank {self.rank}: {e.__class__.__name__}: {e}"

    def _agree(self, error: str | None) -> str | None:
        """The first rank's error, on every rank (collective)."""
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        return next((e for e in errors if e), None)

    def _all(self, flag: bool) -> bool:
        value = torch.tensor([0 if flag else 1], device=_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return not bool(value.item())

    def _prune(self) -> None:
        for old in step_dirs(self.root.parent)[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- loading --------------------------------------------------------------------------------------

    def load(self, engine, path: Path, layout: dict) -> dict:
        """Restore the optimizer (master weights, moments, step count, schedule) of ``path`` into ``engine`` (whose
        model was built from the same checkpoint's weights), whatever the layout that wrote it. ``path`` has been
        verified by the caller."""
        state = _read_json(path / STATE)
        engine.load_optimizer(weights_reader(path), state["optimizer_steps"])
        rng = path / "rng" / f"rank_{self.rank:05d}.json"
        if state.get("layout") == layout and rng.is_file():
            _set_rng_state(json.loads(rng.read_text()))
        return state


class _BackgroundSave:
    """One rank's part of an asynchronous save, written by a thread from a host-memory snapshot."""

    def __init__(self, owner: Checkpointer, step: int, tmp: Path, final: Path, pieces, shapes, texts):
        self.step, self.tmp, self.final = step, tmp, final
        self.error: str | None = None

        def run():
            self.error = owner._guard(lambda: owner._write(tmp, pieces, shapes, texts))

        self.thread = threading.Thread(target=run, name=f"checkpoint-{step}", daemon=True)
        self.thread.start()

    def done(self) -> bool:
        return not self.thread.is_alive()

    def join(self) -> str | None:
        self.thread.join()
        return self.error


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _bytes_text(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _rng_state() -> dict:
    """Every generator's state as JSON (nothing in a checkpoint is a pickle)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": _bytes_text(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = _bytes_text(torch.cuda.get_rng_state().cpu())
    return state


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]))


def load_inference_model(path: str | Path) -> torch.nn.Module:
    """The model of a checkpoint (or a run's latest, or a ``chimera export --format safetensors`` directory), on one
    process, in eval mode; no process group needed."""
    from chimera.export import safetensors_format
    from chimera.models.causal_lm import meta_model
    from chimera.parallel.sharding import load_full_state_dict

    if safetensors_format.is_export_dir(path):
        return safetensors_format.load_model(path)
    ckpt = resolve_checkpoint(path)
    verify(ckpt)
    model_cfg: ModelConfig = read_config(ckpt).model
    model = meta_model(model_cfg)  # one process, nothing split: ParallelDims()
    load_full_state_dict(model, read_weights(ckpt))
    return model.eval()


def write_weights_checkpoint(run_dir: str | Path, model_cfg: ModelConfig, weights: dict, source: str,
                             tokenizer_file: Path | None = None) -> Path:
    """A new run directory whose only checkpoint (step 0) holds full weights, no optimizer state.

    ``chimera train RUN_DIR/run.yaml --run-dir RUN_DIR`` continues from it; ``run.yaml`` is a
    template run file with the model spelled out. Written under a temporary name, then renamed.
    ``tokenizer_file``: a tokenizer.json copied to ``RUN_DIR/tokenizer.json``, the run's ``data.tokenizer``
    (default: bytes).
    """
    from chimera.configs.schema import DataConfig, TrainConfig

    run_dir = Path(run_dir)
    tmp = run_dir.with_name(f".{run_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt = tmp / CHECKPOINTS / step_tag(0)
    ckpt.mkdir(parents=True)
    try:
        data = DataConfig()
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
            data = DataConfig(tokenizer=str(run_dir.resolve() / "tokenizer.json"))
        run = RunConfig(model=model_cfg, data=data, train=TrainConfig(steps=1000))
        text = yaml.safe_dump(run.model_dump(mode="json"), sort_keys=False)
        (tmp / "run.yaml").write_text(f"# {source}: edit train/data/parallel, then\n"
                                      f"# chimera train {run_dir}/run.yaml --run-dir {run_dir}\n" + text)
        writer = StoreWriter(ckpt / TENSORS, 0)
        for name, t in weights.items():
            writer.add(f"{WEIGHTS}/{name}", tuple((0, n) for n in t.shape), 0, t.numel(), t.reshape(-1))
        writer.close()
        write_shapes(ckpt / TENSORS, {f"{WEIGHTS}/{name}": list(t.shape) for name, t in weights.items()})
        (ckpt / CONFIG).write_text(text)
        (ckpt / STATE).write_text(json.dumps({"step": 0, "weights_only": True, "source": source}, indent=1))
        _write_manifest(ckpt)
        (tmp / CHECKPOINTS / LATEST).write_text(ckpt.name)
        os.replace(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir
