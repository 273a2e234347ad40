"""The training loop: topology -> model -> DeepSpeed engine -> data -> steps, validation, checkpoints.

It knows no architecture: the model is built from the config's layer pattern by ``chimera.models``, and a step
is micro-steps of ``loss = engine(inputs, labels)`` and ``engine.backward(loss)``, then one ``engine.step()``
(``TrainingEngine.train_batch``).

Around the steps, what keeps a long run alive and its records true:

* it starts from the newest valid checkpoint (all ranks check its checksums; a bad one is skipped, said, and the
  one before it tried), refusing a changed model (``chimera.trainer.resumption``);
* a bad step (NaN/inf loss or gradient norm, a loss spike) skips its update; too many in a row roll the run back to
  its last checkpoint with their batches skipped (``chimera.trainer.bad_steps``); ``train.skip_steps`` skips
  known bad batches;
* a stop request (a preemption signal, Ctrl-C, the job's time limit: ``chimera.trainer.stopping``) is agreed
  over all ranks at each step boundary: all save and stop after the same step;
* a save the file system refuses is reported and retried at the next interval; saves may run in the background;
* a step slower than ``parallel.timeout`` dumps every rank's stack; per-rank step times and peak memory are
  logged every ``logging.rank_stats_every`` steps (``chimera.trainer.watchdog``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from chimera.configs.schema import RunConfig, accumulation_steps, parse_duration, validate_layout
from chimera.data.loader import DataPipeline
from chimera.errors import UserError
from chimera.models.causal_lm import build_model
from chimera.parallel import topology
from chimera.parallel.pipeline import stage_bounds, stage_parts
from chimera.parallel.sharding import shard_box
from chimera.trainer import events, stopping
from chimera.trainer.bad_steps import BadStepMonitor
from chimera.trainer.checkpoint import (
    Checkpointer,
    is_weights_only,
    newest_valid_together,
    read_config,
    step_dirs,
    weights_reader,
)
from chimera.trainer.engine import TrainingEngine, zero3_partitioner
from chimera.trainer.host_memory import keep_freed_blocks_if_room, map_large_blocks_apart, release_free_host_memory
from chimera.trainer.metrics import MetricsLogger, ModelFlopsRate
from chimera.trainer.resumption import compare, refusal, start_from_weights, supersede
from chimera.trainer.watchdog import StepWatchdog, rank_stats

STOP_SIGNAL, STOP_DEADLINE = 1, 2  # why a run stops early, as agreed over the ranks


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, announce: bool = True):
        """``announce``: say on rank 0 which checkpoint the run resumes from and what changed (the CLI, having said
        it before starting the ranks, passes False)."""
        self.cfg, self.run_dir = cfg, Path(run_dir)
        par, t = cfg.parallel, cfg.train
        map_large_blocks_apart()  # freed shards, gathers and gradients go back to the system (host_memory)
        self.topo = topology.initialize(par.tensor, par.pipeline, par.context, par.expert, par.timeout)
        self.is_main = self.topo.is_main
        self.dp = validate_layout(cfg, self.topo.world_size)
        self.device = topology.device()
        self.accumulation = accumulation_steps(t, self.dp)  # micro-batches per optimizer step on each rank
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len
        self.flops_rate = ModelFlopsRate(cfg.model, self.device, t.precision, self.topo.world_size)
        self.data = DataPipeline(cfg.data, t.micro_batch_size, t.global_batch_size)
        if self.data.vocab_size > cfg.model.vocab_size:
            raise UserError(f"the data's tokenizer has {self.data.vocab_size} tokens but model.vocab_size is "
                            f"{cfg.model.vocab_size}; raise model.vocab_size (a multiple of parallel.tensor)")

        torch.manual_seed(t.seed)
        dims = self.topo.dims(par.sequence_parallel)
        self.checkpoint, self.saved_state, self.changes, weights = self._starting_point(dims, announce)
        bounds = stage_bounds(cfg.model, par.pipeline, cfg.data.seq_len) if par.pipeline > 1 else None
        model = build_model(cfg.model, dims, seed=t.seed, device=self.device, weights=weights,
                            parts=None if bounds is None else stage_parts(cfg.model, bounds, self.topo.pipeline_rank),
                            each_part=zero3_partitioner(cfg, self.topo))
        model.activation_checkpointing = t.activation_checkpointing
        model.label_smoothing = t.label_smoothing  # read by the training loss only
        self.num_parameters = model.num_parameters()
        self.stage_bounds = bounds
        self.engine = TrainingEngine(model, cfg, self.topo, self.accumulation, bounds)
        release_free_host_memory()  # what building the shards and the engine freed, before the first step needs it
        self.heap_decided = False  # whether freed blocks are kept for reuse: decided after the first step
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep, self.topo.rank,
                                         asynchronous=cfg.checkpoint.asynchronous, report=self._say)
        self.layout = {"tensor": self.topo.tensor, "pipeline": self.topo.pipeline, "context": self.topo.context,
                       "expert": self.topo.expert, "data": self.dp, "zero_stage": par.zero_stage}
        self.step, self.data_state = 0, self.data.initial_state()
        self._save_attempted: int | None = None
        self.skipped: list[int] = []  # steps whose update was skipped (bad, or in skip_steps), so far
        self.monitor = BadStepMonitor(t.spike)
        self.engine.gate.judge = self.monitor.judge

    def _say(self, line: str) -> None:
        if self.is_main:
            print(line, flush=True)

    # ---- state ----------------------------------------------------------------------------------

    def _starting_point(self, dims, announce: bool):
        """The run's newest valid checkpoint (resumable, or weights only, e.g. from `chimera import-hf`), its trainer
        state, the config changes against it, and how the model reads its weights from it: this rank's shard of
        each, whatever layout wrote them. ``(None, None, None, None)`` without one."""
        def skipped(line):
            self._say(f"chimera: {line}")
            if self.is_main:
                events.record(self.run_dir, "checkpoint_skipped", reason=line)

        candidates = step_dirs(self.run_dir)
        path = newest_valid_together(candidates, skipped)
        if path is None:
            if candidates:
                raise UserError(f"no valid checkpoint in {self.run_dir / 'checkpoints'} (each failed its check, see "
                                "above); repair or move them away, or start afresh with --restart")
            return None, None, None, None
        state = json.loads((path / "trainer_state.json").read_text())
        saved = read_config(path)
        if is_weights_only(path):
            start_from_weights(path, saved, state, self.cfg)
            changes = None
        else:
            changes = compare(saved, state, self.cfg)
            if changes.refused:
                raise refusal(path, changes)
            if announce and changes.said:
                self._say(f"chimera: resuming with changes: {'; '.join(changes.said)}")
        reader = weights_reader(path)
        return path, state, changes, lambda name, p: reader.read(f"model/{name}", shard_box(p, dims))

    @property
    def initialised_from(self) -> Path | None:
        """A weights-only checkpoint the model started from, if any."""
        return self.checkpoint if self.checkpoint is not None and is_weights_only(self.checkpoint) else None

    def resume_if_possible(self) -> bool:
        if self.checkpoint is None or self.initialised_from is not None:
            return False
        self.engine.schedule.anchor = self.changes.anchor if self.changes else None
        state = self.checkpointer.load(self.engine, self.checkpoint, self.layout)
        self.step, self.data_state = state["step"], state["data"]
        self.data_state["cursors"] = {n: self.data_state["cursors"].get(n, 0) for n in self.data.names}
        self.skipped = list(state.get("skipped_steps", []))
        self.monitor = BadStepMonitor(self.cfg.train.spike, state.get("bad_steps"))
        self.engine.gate.judge = self.monitor.judge
        self.checkpointer.last_saved = self._save_attempted = self.step
        return True

    def save(self) -> Path | None:
        self._save_attempted = self.step
        anchor = self.engine.schedule.anchor
        state = {"step": self.step, "data": self.data_state, "layout": self.layout, "skipped_steps": self.skipped,
                 "bad_steps": self.monitor.state(),
                 "schedule_anchor": None if anchor is None else {"step": anchor.step, "lr": anchor.lr}}
        path = self.checkpointer.save(self.engine, self.cfg, state)
        if path is None and self.is_main:
            events.record(self.run_dir, "checkpoint_failed", step=self.step)
        return path

    # ---- steps ----------------------------------------------------------------------------------

    def skip_steps(self) -> set[int]:
        return set(self.cfg.train.skip_steps) | events.skip_steps(self.run_dir)

    def train_step(self) -> tuple[float | None, dict]:
        """One optimizer step over the global batch; returns its loss (the mean over all ranks; None when the step was
        skipped) and the data log (with ``skipped``: why the update did not happen, if it did not).

        Each rank runs ``accumulation`` micro-batches of forward and backward on its share of the batch (with
        pipeline stages, as a 1F1B schedule over the stages), then the engine reduces the gradients over data x
        context ranks, clips, updates the weights and the learning rate."""
        plan = self.data.plan(self.step, self.data_state)  # the global batch of this step (a pure function)
        step = self.step + 1
        if step in self.skip_steps():  # a known bad batch: read, not trained on
            loss, why = None, "skip_steps"
            plan.log["step_tokens"] = 0
        else:
            micro_batches = self.data.micro_batches(plan, self.topo.data_rank, self.dp)  # this rank's share
            assert len(micro_batches) == self.accumulation, (len(micro_batches), self.accumulation)
            faults = self.cfg.train.fault_injection
            poisoned = step in faults.nan_loss_at
            if step in faults.stall_at and self.is_main:
                time.sleep(faults.stall_seconds)
            loss = self.engine.train_batch([{k: v.to(self.device) for k, v in b.items()} for b in micro_batches],
                                           poisoned=poisoned)
            why = self.engine.gate.verdict
            plan.log["step_tokens"] = sum(b["input_ids"].numel() for b in micro_batches) * self.dp
        if why is not None:
            self.skipped.append(step)
        plan.log["skipped"] = why
        if not self.heap_decided:  # after this process's first step: its peak so far says whether there is room
            self.heap_decided = True
            if self.device.type == "cpu":  # a CPU step's activations are host blocks (host_memory)
                keep_freed_blocks_if_room(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self.data_state = plan.next_state
        self.step = step
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

    def _agree(self, deadline: float | None) -> tuple[int, bool]:
        """(why every rank stops after this step: 0, STOP_SIGNAL or STOP_DEADLINE; whether every rank's background
        save is written), agreed in one all-reduce."""
        mine = STOP_SIGNAL if stopping.REQUEST.reason else (
            STOP_DEADLINE if self.is_main and stopping.past(deadline) else 0)
        flags = torch.tensor([mine, 0 if self.checkpointer.pending_done() else 1], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # NCCL reduces device tensors only
        return int(flags[0].item()), not bool(flags[1].item())

    # ---- the run --------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train until ``train.steps`` (or ``stop_after``, a stop request, a rollback). Returns ``step``, ``val_loss``,
        ``stopped`` (why the run stopped early, or None), ``rollback`` and ``final_save_failed``."""
        cfg, t = self.cfg, self.cfg.train
        is_main = self.is_main
        resumed = self.resume_if_possible()
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            superseded = supersede(self.run_dir, self.step)
            if not resumed and self.data.windowed_sources():  # how few long documents were cut for the split
                events.record(self.run_dir, "data_windows", sources=self.data.windowed_sources())
            if resumed or superseded:
                events.record(self.run_dir, "resume", step=self.step, checkpoint=str(self.checkpoint),
                              changes=self.changes.said if self.changes else [], superseded_rows=superseded)
        metrics = MetricsLogger(self.run_dir, cfg.logging, cfg.model_dump(mode="json"), is_main, t.steps)
        if is_main and self.flops_rate.flops_per_token(cfg.data.seq_len) is not None:
            self.flops_rate.write_basis(self.run_dir, cfg.data.seq_len)
        if is_main:
            where = f"resumed at step {self.step}" if resumed else (
                f"from the weights of {self.initialised_from}" if self.initialised_from else "from scratch")
            print(f"chimera: {cfg.model.name} ({self.num_parameters:,} parameters), "
                  f"{self.topo.world_size} process(es) {self.topo.describe()} ZeRO-{cfg.parallel.zero_stage}, "
                  f"{where}" + self._baseline_text(), flush=True)
        stopping.install(cfg.launch.stop_signals)
        deadline = stopping.deadline(parse_duration(cfg.launch.save_before_end))
        watchdog = StepWatchdog(self.run_dir, self.topo.rank, cfg.parallel.timeout)

        val_loss, stopped, rollback = None, None, False
        target = min(t.steps, t.stop_after) if t.stop_after else t.steps  # stop_after: end early, resumable
        try:
            while self.step < target:
                watchdog.arm()
                lr = self.engine.get_lr()  # the rate this step uses
                start = time.perf_counter()
                loss, data_log = self.train_step()
                elapsed = time.perf_counter() - start
                row = self._row(loss, lr, elapsed, data_log)
                if data_log["skipped"] not in (None, "skip_steps"):
                    rollback = self.monitor.record(self.step, float("nan") if loss is None else loss, "bad")
                    self._say(f"chimera: step {self.step}: update skipped ({data_log['skipped']})")
                    if is_main:
                        events.record(self.run_dir, "bad_step", step=self.step, reason=data_log["skipped"],
                                      loss=row.get("loss"), grad_norm=row.get("grad_norm"))
                elif loss is not None:
                    self.monitor.record(self.step, loss, None)
                if cfg.logging.rank_stats_every and self.step % cfg.logging.rank_stats_every == 0:
                    row.update(rank_stats(elapsed))
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps):
                    row.update(self.validation_losses())
                    val_loss = row["val_loss"]
                if self.step % t.log_every == 0 or "val_loss" in row or self.step == t.steps or data_log["skipped"]:
                    row.update(self.data.read_stats())  # shard reads since the last logged row (webdataset)
                    metrics.log(row)
                if cfg.data.log_samples and is_main:
                    with open(self.run_dir / "samples.jsonl", "a") as f:
                        f.write(json.dumps({"step": self.step, "samples": data_log["samples"]}) + "\n")
                why, written = self._agree(deadline)
                self.checkpointer.poll(done_everywhere=written)
                watchdog.disarm()
                if rollback:
                    self._roll_back()
                    break
                every = cfg.checkpoint.every
                if (every and self.step % every == 0) or self.step == target or why:
                    self.save()
                if why:
                    stopped = (stopping.REQUEST.reason or "a signal to another rank") if why == STOP_SIGNAL \
                        else "the time limit"
                    self._say(f"chimera: stopped after step {self.step} ({stopped}); run the same command again to "
                              "resume")
                    if is_main:
                        events.record(self.run_dir, "stop", step=self.step, reason=stopped)
                    break
            if not rollback and self._save_attempted != self.step:
                self.save()
            self.checkpointer.wait()
        finally:
            watchdog.close()
            metrics.close()
        final_failed = not rollback and self.checkpointer.last_saved != self.step
        self._summary(val_loss, stopped, rollback)
        return {"step": self.step, "val_loss": val_loss, "stopped": stopped, "rollback": rollback,
                "final_save_failed": final_failed}

    def _row(self, loss: float | None, lr: float, elapsed: float, data_log: dict) -> dict:
        finite = loss is not None and math.isfinite(loss)
        row = {"step": self.step, "loss": loss if finite else None, "lr": lr,
               "tokens_per_s": self.tokens_per_step / elapsed, "seq_len": data_log["seq_len"],
               "step_tokens": data_log["step_tokens"], "consumed_sequences": self.data_state["sequences"]}
        if self.is_main:  # the rank that logs (the peak may be measured once, on it)
            row.update(self.flops_rate.row(data_log["seq_len"], row["tokens_per_s"]))
        if data_log["skipped"] != "skip_steps" and self.engine.gate.grad_norm is not None:
            row["grad_norm"] = self.engine.gate.grad_norm  # before clipping
        if data_log["skipped"]:
            row["skipped"] = data_log["skipped"]
        if self.skipped:
            row["skipped_steps"] = len(self.skipped)
        if self.checkpointer.failures:
            row["checkpoint_failures"] = self.checkpointer.failures
        if len(self.data.names) > 1:
            row["source_sequences"] = data_log["source_sequences"]
        if self.data.bad.total:
            row["bad_data_skipped"] = dict(self.data.bad.counts)
        if data_log["skipped"] != "skip_steps":
            row.update(self.engine.training_metrics())  # model-defined extras (e.g. MoE router losses, expert load)
        return row

    def _roll_back(self) -> None:
        """Too many bad steps in a row: their batches are skipped from now on, and the run starts again from its
        last checkpoint (``train`` rebuilds the trainer)."""
        bad = list(range(self.monitor.first_in_a_row, self.step + 1))
        if self.is_main:
            events.add_skip_steps(self.run_dir, bad)
            events.record(self.run_dir, "rollback", to_step=self.checkpointer.last_saved, skip_steps=bad)
        self._say(f"chimera: {len(bad)} bad steps in a row (steps {bad[0]}-{bad[-1]}): rolling back to the last "
                  f"checkpoint (step {self.checkpointer.last_saved or 0}) and skipping their batches")
        self.checkpointer.wait()
        dist.barrier()

    def _baseline_text(self) -> str:
        unigram = self.data.unigram_cross_entropy()
        return "" if unigram is None else f"; unigram baseline {unigram:.3f} nats/token"

    def _summary(self, val_loss: float | None, stopped: str | None, rollback: bool) -> None:
        if not self.is_main or rollback:
            return
        if self.data.bad.total:
            print(f"chimera: bad data: {self.data.bad.summary()} ({self.data.excluded_documents()} documents "
                  f"left out): {'; '.join(self.data.bad.examples)}", flush=True)
        where = (f"checkpoint in {self.run_dir / 'checkpoints'}" if self.checkpointer.last_saved == self.step
                 else "no checkpoint of this step could be written (see above)")
        text = f"chimera: step {self.step}{' (stopped early)' if stopped else ''}"
        unigram = self.data.unigram_cross_entropy()
        if val_loss is not None:
            text += f": validation loss {val_loss:.3f} nats/token"
            if unigram is not None:
                change = 100 * (1 - val_loss / unigram)
                text += (f" vs unigram baseline {unigram:.3f} ({abs(change):.0f}% "
                         f"{'lower' if change >= 0 else 'higher'})")
        print(f"{text}; {where}", flush=True)


def train(cfg: RunConfig, run_dir: str | Path, announce: bool = True) -> dict:
    """Run the trainer; after a rollback, again from the last checkpoint (same processes, same process group)."""
    while True:
        trainer = Trainer(cfg, run_dir, announce)
        result = trainer.run()
        if not result["rollback"]:
            return result
        del trainer
        release_free_host_memory()
        announce = False
