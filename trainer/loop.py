"""The training loop: topology -> model -> DeepSpeed engine -> data -> steps, validation, checkpoints.

It knows no architecture: the model is built from the config's layer pattern by
``chimera.models``, and a step is micro-steps of ``loss = engine(inputs, labels)`` and
``engine.backward(loss)``, then one ``engine.step()`` (``train_step``).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from chimera.configs.schema import RunConfig, accumulation_steps, validate_layout
from chimera.data.loader import DataPipeline
from chimera.errors import UserError
from chimera.models.causal_lm import build_model
from chimera.parallel import topology
from chimera.parallel.pipeline import stage_bounds, stage_parts
from chimera.parallel.sharding import shard_box
from chimera.trainer.checkpoint import (
    Checkpointer,
    is_weights_only,
    latest_checkpoint,
    read_config,
    verify_together,
    weights_reader,
)
from chimera.trainer.engine import TrainingEngine, zero3_partitioner
from chimera.trainer.host_memory import map_large_blocks_apart, release_free_host_memory
from chimera.trainer.metrics import MetricsLogger


def same_model(a, b) -> bool:
    """Whether two model configs describe the same model (its name, preset and stage boundaries aside)."""
    def key(cfg):
        data = cfg.model_dump(exclude={"name", "preset"})
        data["pattern"] = data["pattern"].replace("|", "")
        return data
    return key(a) == key(b)


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        par, t = cfg.parallel, cfg.train
        map_large_blocks_apart()  # freed shards, gathers and gradients go back to the system (host_memory)
        self.topo = topology.initialize(par.tensor, par.pipeline, par.context, par.expert)
        self.dp = validate_layout(cfg, self.topo.world_size)
        self.device = topology.device()
        self.accumulation = accumulation_steps(t, self.dp)  # micro-batches per optimizer step on each rank
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len
        self.data = DataPipeline(cfg.data, t.micro_batch_size, t.global_batch_size)
        if self.data.vocab_size > cfg.model.vocab_size:
            raise UserError(f"the data's tokenizer has {self.data.vocab_size} tokens but model.vocab_size is "
                            f"{cfg.model.vocab_size}; raise model.vocab_size (a multiple of parallel.tensor)")

        torch.manual_seed(t.seed)
        dims = self.topo.dims(par.sequence_parallel)
        self.checkpoint, weights = self._starting_point(dims)
        bounds = stage_bounds(cfg.model, par.pipeline, cfg.data.seq_len) if par.pipeline > 1 else None
        model = build_model(cfg.model, dims, seed=t.seed, device=self.device, weights=weights,
                            parts=None if bounds is None else stage_parts(cfg.model, bounds, self.topo.pipeline_rank),
                            each_part=zero3_partitioner(cfg, self.topo))
        model.activation_checkpointing = t.activation_checkpointing
        self.num_parameters = model.num_parameters()
        self.stage_bounds = bounds
        self.engine = TrainingEngine(model, cfg, self.topo, self.accumulation, bounds)
        release_free_host_memory()  # what building the shards and the engine freed, before the first step needs it
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep, self.topo.rank)
        self.layout = {"tensor": self.topo.tensor, "pipeline": self.topo.pipeline, "context": self.topo.context,
                       "expert": self.topo.expert, "data": self.dp, "zero_stage": par.zero_stage}
        self.step, self.data_state = 0, self.data.initial_state()
        self._stop_requested = False

    # ---- state ----------------------------------------------------------------------------------

    def _starting_point(self, dims) -> tuple[Path | None, object]:
        """The run's latest checkpoint (a resumable one, or weights only, e.g. from `chimera import-hf`) and how the
        model reads its weights from it: this rank's shard of each, whatever layout wrote them; (None, None)
        without one."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return None, None
        verify_together(path)
        saved = read_config(path).model
        if not same_model(saved, self.cfg.model):
            current = self.cfg.model.model_dump()
            diff = sorted(k for k, v in saved.model_dump(exclude={"name", "preset"}).items() if current.get(k) != v)
            raise UserError(f"the run's model differs from checkpoint {path} in {diff}; use the run's config.yaml "
                            "(or run.yaml) for the model section, or another --run-dir")
        reader = weights_reader(path)
        return path, lambda name, p: reader.read(f"model/{name}", shard_box(p, dims))

    @property
    def initialised_from(self) -> Path | None:
        """A weights-only checkpoint the model started from, if any."""
        return self.checkpoint if self.checkpoint is not None and is_weights_only(self.checkpoint) else None

    def resume_if_possible(self) -> bool:
        if self.checkpoint is None or self.initialised_from is not None:
            return False
        state = self.checkpointer.load(self.engine, self.checkpoint, self.layout)
        self.step, self.data_state = state["step"], state["data"]
        return True

    def save(self) -> Path:
        state = {"step": self.step, "data": self.data_state, "layout": self.layout}
        return self.checkpointer.save(self.engine, self.cfg, state)

    # ---- steps ----------------------------------------------------------------------------------

    def train_step(self) -> tuple[float, dict]:
        """One optimizer step over the global batch; returns its loss (the mean over all ranks) and the data log.

        Each rank runs ``accumulation`` micro-batches of forward and backward on its share of the batch (with
        pipeline stages, as a 1F1B schedule over the stages), then the engine reduces the gradients over data x
        context ranks, clips, updates the weights and the learning rate."""
        plan = self.data.plan(self.step, self.data_state)  # the global batch of this step (a pure function)
        micro_batches = self.data.micro_batches(plan, self.topo.data_rank, self.dp)  # this rank's share
        assert len(micro_batches) == self.accumulation, (len(micro_batches), self.accumulation)
        loss = self.engine.train_batch([{k: v.to(self.device) for k, v in b.items()} for b in micro_batches])
        plan.log["step_tokens"] = sum(b["input_ids"].numel() for b in micro_batches) * self.dp
        self.data_state = plan.next_state
        self.step += 1
        return loss, plan.log

    def validation_losses(self) -> dict[str, float]:
        """``val_loss`` (weighted over sources) and ``val_loss/<source>`` when there are several."""
        t = self.cfg.train
        out = {}
        for i, name in enumerate(self.data.names):
            batches = self.data.validation_batches(i, t.eval_batches, self.topo.data_rank, self.dp, t.micro_batch_size)
            out[name] = self.engine.eval_loss([{k: v.to(self.device) for k, v in b.items()} for b in batches])
        weights = [s.weight for s in self.cfg.data.sources]
        row = {"val_loss": sum(w * out[n] for w, n in zip(weights, self.data.names)) / sum(weights)}
        if len(out) > 1:
            row.update({f"val_loss/{n}": v for n, v in out.items()})
        return row

    def _baseline_text(self) -> str:
        unigram = self.data.unigram_cross_entropy()
        return "" if unigram is None else f"; unigram baseline {unigram:.3f} nats/token"

    def _on_signal(self, signum, frame):
        self._stop_requested = True

    def _any_rank_stopping(self) -> bool:
        """A preemption signal may reach some ranks only; all ranks must stop at the same step."""
        flag = torch.tensor([int(self._stop_requested)], device=self.device)  # NCCL reduces GPU tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ---- the run --------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        is_main = self.topo.is_main
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        resumed = self.resume_if_possible()
        metrics = MetricsLogger(self.run_dir, cfg.logging, cfg.model_dump(mode="json"), is_main, t.steps)
        if is_main:
            where = f"resumed at step {self.step}" if resumed else (
                f"from the weights of {self.initialised_from}" if self.initialised_from else "from scratch")
            print(f"chimera: {cfg.model.name} ({self.num_parameters:,} parameters), "
                  f"{self.topo.world_size} process(es) {self.topo.describe()} ZeRO-{cfg.parallel.zero_stage}, "
                  f"{where}" + self._baseline_text(), flush=True)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

        last_saved = self.step if resumed else None
        val_loss = None
        target = min(t.steps, t.stop_after) if t.stop_after else t.steps  # stop_after: end early, resumable
        while self.step < target:
            lr = self.engine.get_lr()  # the rate this step uses
            start = time.perf_counter()
            loss, data_log = self.train_step()
            elapsed = time.perf_counter() - start
            row = {"step": self.step, "loss": loss, "lr": lr, "tokens_per_s": self.tokens_per_step / elapsed,
                   "seq_len": data_log["seq_len"], "step_tokens": data_log["step_tokens"],
                   "consumed_sequences": self.data_state["sequences"]}
            if len(self.data.names) > 1:
                row["source_sequences"] = data_log["source_sequences"]
            if self.data.bad.total:
                row["bad_data_skipped"] = dict(self.data.bad.counts)
            row.update(self.engine.training_metrics())  # model-defined extras (e.g. MoE router losses, expert load)
            if cfg.data.log_samples and is_main:
                with open(self.run_dir / "samples.jsonl", "a") as f:
                    f.write(json.dumps({"step": self.step, "samples": data_log["samples"]}) + "\n")
            if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps):
                row.update(self.validation_losses())
                val_loss = row["val_loss"]
            if self.step % t.log_every == 0 or "val_loss" in row or self.step == t.steps:
                metrics.log(row)
            preempted = self._any_rank_stopping()
            every = cfg.checkpoint.every
            if (every and self.step % every == 0) or self.step == target or preempted:
                self.save()
                last_saved = self.step
            if preempted:
                break
        if last_saved != self.step:
            self.save()
        metrics.close()
        if self.data.bad.total and is_main:
            print(f"chimera: bad data: {self.data.bad.summary()} ({self.data.excluded_documents()} documents "
                  f"left out): {'; '.join(self.data.bad.examples)}", flush=True)
        unigram = self.data.unigram_cross_entropy()
        if is_main and val_loss is not None and unigram is not None:
            print(f"chimera: step {self.step}: validation loss {val_loss:.3f} nats/token vs unigram baseline "
                  f"{unigram:.3f} ({100 * (1 - val_loss / unigram):.0f}% lower); checkpoint in "
                  f"{self.run_dir / 'checkpoints'}", flush=True)
        return {"step": self.step, "val_loss": val_loss}


def train(cfg: RunConfig, run_dir: str | Path) -> dict:
    return Trainer(cfg, run_dir).run()
