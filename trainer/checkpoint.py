"""Checkpoints: save, find, verify, resume; and loading a model for inference.

A checkpoint is one directory ``RUN_DIR/checkpoints/step_XXXXXXXX/`` holding

* DeepSpeed's model/optimizer/scheduler shards (layout-specific: used to resume training),
* ``model.pt``: the full fp32 weights (layout-free: inference, export, other layouts),
* ``trainer_state.json``: step, the data loader's state (a few cursors), the parallel layout,
* ``config.yaml``: the resolved run config, ``rng/rank_*.pt``: every rank's RNG states,
* ``MANIFEST.json``: size and sha256 of every file.

It is written under a temporary name and renamed when complete; ``checkpoints/latest`` (replaced
atomically) names the newest one. A crash mid-save leaves the previous checkpoint intact.
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

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "trainer_state.json"
MANIFEST = "MANIFEST.json"
WEIGHTS = "model.pt"
CONFIG = "config.yaml"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_manifest(path: Path) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    manifest = {"files": {str(p.relative_to(path)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                          for p in files}}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))


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


def verify(path: Path) -> dict:
    """Check every file against the manifest; return the trainer state."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        state = json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(
            f"checkpoint {path} is unreadable ({e}); delete it and its `latest` entry to resume from an older one"
        ) from None
    for rel, meta in manifest["files"].items():
        f = path / rel
        if not f.is_file() or f.stat().st_size != meta["bytes"] or sha256_file(f) != meta["sha256"]:
            raise UserError(
                f"checkpoint {path}: file {rel} is missing or does not match its checksum; "
                f"the checkpoint is corrupt, resume from an older one"
            )
    return state


def read_config(path: Path) -> RunConfig:
    return RunConfig.model_validate(yaml.safe_load((path / CONFIG).read_text()))


class Checkpointer:
    """Saves and restores a run's checkpoints; every method is collective over all ranks."""

    def __init__(self, run_dir: str | Path, keep: int, rank: int):
        self.root = Path(run_dir) / CHECKPOINTS
        self.keep, self.rank = keep, rank

    def save(self, engine, full_weights_fn, cfg: RunConfig, state: dict) -> Path:
        step = state["step"]
        final, tmp = self.root / step_tag(step), self.root / f".tmp_{step_tag(step)}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=tmp.name, save_latest=False)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank_{self.rank:05d}.pt")
        weights = full_weights_fn()
        if self.rank == 0:
            torch.save(weights, tmp / WEIGHTS)
            (tmp / CONFIG).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            (tmp / STATE).write_text(json.dumps(state, indent=1))
        dist.barrier()
        if self.rank == 0:
            _write_manifest(tmp)
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
        state = verify(path) if self.rank == 0 else json.loads((path / STATE).read_text())
        if not _compatible(state["layout"], layout):
            raise UserError(
                f"checkpoint {path.name} was written with layout {state['layout']} but this run has {layout}; "
                f"resume with the same parallel settings (the data-parallel size may change under ZeRO-0)"
            )
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
        if load_path is None:
            raise UserError(f"DeepSpeed could not load checkpoint {path}; it is incomplete or from another run")
        rng = path / "rng" / f"rank_{self.rank:05d}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        return state


def _compatible(saved: dict, current: dict) -> bool:
    """Same layout; or, under ZeRO-0 (optimizer state not partitioned), any data-parallel size."""
    if saved == current:
        return True
    ignore = {"data"} if saved["zero_stage"] == current["zero_stage"] == 0 else set()
    return {k: v for k, v in saved.items() if k not in ignore} == {k: v for k, v in current.items() if k not in ignore}


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
    load_full_state_dict(model, torch.load(ckpt / WEIGHTS, map_location="cpu", weights_only=True))
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
        torch.save(weights, ckpt / WEIGHTS)
        (ckpt / CONFIG).write_text(text)
        (ckpt / STATE).write_text(json.dumps({"step": 0, "weights_only": True, "source": source}, indent=1))
        _write_manifest(ckpt)
        (tmp / CHECKPOINTS / LATEST).write_text(ckpt.name)
        os.replace(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir
