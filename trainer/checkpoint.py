"""Checkpoints: save, find, verify, resume (on any layout); and loading a model for inference.

A checkpoint is one directory ``RUN_DIR/checkpoints/step_XXXXXXXX/`` holding

* ``tensors/``: a layout-free store of logical tensors (``chimera.trainer.tensor_store``, zarr): for every
  parameter its full fp32 master weights ``model/NAME`` and AdamW moments ``exp_avg/NAME``,
  ``exp_avg_sq/NAME``, as full (unsharded) tensors whatever the layout that wrote them;
* ``trainer_state.json``: step, optimizer steps, the data loader's state (a few cursors), the layout;
* ``config.yaml``: the resolved run config, ``rng/rank_*.pt``: every rank's RNG states;
* ``manifest/rank_*.json`` and ``MANIFEST.json``: size and sha256 of every file.

**Saving** is parallel and never gathers: each rank writes the fragments of master weights and moments it
holds (``chimera.trainer.optimizer_state``; a tensor-parallel shard, a ZeRO partition of it) to its own
files of the store and hashes only those; replicas (tensor-parallel copies, tied pipeline copies, the
data-parallel copies without ZeRO) are written once. Rank 0 merges the ranks' manifests. The directory
is written under a temporary name and renamed when complete; ``checkpoints/latest`` (replaced
atomically) names the newest one. A crash mid-save leaves the previous checkpoint intact.

**Resuming** reads only what a rank holds in the new layout: its shard of each weight (when building the
model), and the fragments of master weights and moments of its partition, from whichever files hold them.
So a run resumes under any (TP, PP, CP, EP, DP, ZeRO) layout with the same ``chimera train`` command;
the data position is layout-free already, the learning-rate schedule a function of the step. RNG states
are restored when the layout is the one that wrote them (training draws no random numbers today).
"""

from __future__ import annotations

import json
import os
import random
import shutil
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
    return json.loads((path / STATE).read_text()).get("weights_only", False)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None; a broken pointer is a UserError."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / STATE).is_file() or not (path / MANIFEST).is_file():
        raise UserError(
            f"{pointer} names checkpoint {path.name!r}, which is missing or incomplete; "
            f"point it at a complete checkpoint in {root} or move the run directory away to start afresh"
        )
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its latest checkpoint) or a checkpoint directory."""
    path = Path(path)
    if (path / STATE).is_file():
        return path
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist; pass a run directory or a checkpoint directory")
    found = latest_checkpoint(path)
    if found is None:
        raise UserError(
            f"{str(path)!r} holds no checkpoint (no {CHECKPOINTS}/{LATEST}); train first or pass a checkpoint"
        )
    return found


def verify(path: Path, share: int = 0, of: int = 1) -> dict:
    """Check the files against the manifest (this process's ``share`` of ``of`` equal parts of them, so that ranks
    verify a checkpoint together); return the trainer state."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        state = json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(
            f"checkpoint {path} is unreadable ({e}); delete it and its `latest` entry to resume from an older one"
        ) from None
    for rel, meta in sorted(manifest["files"].items())[share::of]:
        f = path / rel
        if not f.is_file() or f.stat().st_size != meta["bytes"] or sha256_file(f) != meta["sha256"]:
            raise UserError(
                f"checkpoint {path}: file {rel} is missing or does not match its checksum; "
                f"the checkpoint is corrupt, resume from an older one"
            )
    return state


def verify_together(path: Path) -> dict:
    """``verify`` with every rank checking its share of the files; the first problem found is raised on every rank."""
    problem = None
    try:
        state = verify(path, dist.get_rank(), dist.get_world_size())
    except UserError as e:
        problem, state = str(e), None
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    found = [p for p in problems if p]
    if found:
        raise UserError(found[0])
    return state


def read_config(path: Path) -> RunConfig:
    return RunConfig.model_validate(yaml.safe_load((path / CONFIG).read_text()))


def weights_reader(path: Path) -> StoreReader:
    """The store of a checkpoint; ``model/NAME`` holds each parameter's full weights."""
    return StoreReader(path / TENSORS)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 weights, by name (inference, export)."""
    reader = weights_reader(path)
    prefix = f"{WEIGHTS}/"
    return {n[len(prefix):]: reader.read(n) for n in reader.names() if n.startswith(prefix)}


class Checkpointer:
    """Saves and restores a run's checkpoints; every method is collective over all ranks."""

    def __init__(self, run_dir: str | Path, keep: int, rank: int):
        self.root = Path(run_dir) / CHECKPOINTS
        self.keep, self.rank = keep, rank

    def save(self, engine, cfg: RunConfig, state: dict) -> Path:
        """Every rank writes what it holds (``engine.pieces()``); rank 0 the shapes, config and state."""
        step = state["step"]
        final, tmp = self.root / step_tag(step), self.root / f".tmp_{step_tag(step)}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / TENSORS).mkdir(parents=True)
            (tmp / "rng").mkdir()
            (tmp / "manifest").mkdir()
        dist.barrier()
        writer = StoreWriter(tmp / TENSORS, self.rank)
        for name, box, start, stop, tensors in engine.pieces():
            for kind, t in tensors.items():
                writer.add(f"{kind}/{name}", box, start, stop, t)
        files = writer.close()
        rng = tmp / "rng" / f"rank_{self.rank:05d}.pt"
        torch.save(_rng_state(), rng)
        files.append(rng)
        if self.rank == 0:
            shapes = {f"{kind}/{name}": list(shape) for name, shape in engine.full_shapes().items()
                      for kind in (WEIGHTS, *MOMENTS)}
            files.append(write_shapes(tmp / TENSORS, shapes))
            for name, text in ((CONFIG, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)),
                               (STATE, json.dumps({**state, "optimizer_steps": engine.optimizer_steps()}, indent=1))):
                (tmp / name).write_text(text)
                files.append(tmp / name)
        (tmp / "manifest" / f"rank_{self.rank:05d}.json").write_text(json.dumps(_hashes(tmp, files)))
        dist.barrier()
        if self.rank == 0:
            merged = {}
            for part in sorted((tmp / "manifest").glob("rank_*.json")):
                merged.update(json.loads(part.read_text()))
            (tmp / MANIFEST).write_text(json.dumps({"files": merged}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.root / LATEST, final.name)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, engine, path: Path, layout: dict) -> dict:
        """Restore the optimizer (master weights, moments, step count, schedule) of ``path`` into ``engine`` (whose
        model was built from the same checkpoint's weights), whatever the layout that wrote it."""
        state = verify_together(path)
        engine.load_optimizer(weights_reader(path), state["optimizer_steps"])
        rng = path / "rng" / f"rank_{self.rank:05d}.pt"
        if state.get("layout") == layout and rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        return state


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_inference_model(path: str | Path) -> torch.nn.Module:
    """The model of a checkpoint (or a run's latest), on one process, in eval mode; no process group needed."""
    from chimera.models.causal_lm import meta_model
    from chimera.parallel.sharding import load_full_state_dict

    ckpt = resolve_checkpoint(path)
    verify(ckpt)
    model_cfg: ModelConfig = read_config(ckpt).model
    model = meta_model(model_cfg)  # one process, nothing split: ParallelDims()
    load_full_state_dict(model, read_weights(ckpt))
    return model.eval()


def write_weights_checkpoint(run_dir: str | Path, model_cfg: ModelConfig, weights: dict, source: str) -> Path:
    """A new run directory whose only checkpoint (step 0) holds full weights, no optimizer state.

    ``chimera train RUN_DIR/run.yaml --run-dir RUN_DIR`` continues from it; ``run.yaml`` is a
    template run file with the model spelled out. Written under a temporary name, then renamed.
    """
    from chimera.configs.schema import TrainConfig

    run_dir = Path(run_dir)
    tmp = run_dir.with_name(f".{run_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt = tmp / CHECKPOINTS / step_tag(0)
    ckpt.mkdir(parents=True)
    try:
        run = RunConfig(model=model_cfg, train=TrainConfig(steps=1000))
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
