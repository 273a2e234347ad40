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
from chimera.trainer.checkpoint import (
    WEIGHTS,
    Checkpointer,
    is_weights_only,
    latest_checkpoint,
    read_config,
    verify,
)
from chimera.trainer.engine import build_engine, gathered_full_state_dict
from chimera.trainer.metrics import MetricsLogger


def _mean_over_data_parallel(value: torch.Tensor, topo: topology.Topology) -> float:
    value = value.detach().float().clone()
    dist.all_reduce(value, group=topo.data_group)
    return value.item() / topo.data


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.topo = topology.initialize(cfg.parallel.tensor, cfg.parallel.pipeline)
        self.dp = validate_layout(cfg, self.topo.world_size)
        self.device = topology.device()
        t = cfg.train
        self.accumulation = accumulation_steps(t, self.dp)  # micro-batches per optimizer step on each rank
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len
        self.data = DataPipeline(cfg.data, t.micro_batch_size, t.global_batch_size)
        if self.data.vocab_size > cfg.model.vocab_size:
            raise UserError(f"the data's tokenizer has {self.data.vocab_size} tokens but model.vocab_size is "
                            f"{cfg.model.vocab_size}; raise model.vocab_size (a multiple of parallel.tensor)")

        torch.manual_seed(t.seed)
        self.initialised_from, weights = self._initial_weights()
        model = build_model(cfg.model, self.topo.dims(cfg.parallel.sequence_parallel), seed=t.seed,
                            device=self.device, weights=weights)  # this rank's shards only
        model.activation_checkpointing = t.activation_checkpointing
        self.num_parameters = model.num_parameters()
        self.engine = build_engine(model, cfg, self.accumulation)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep, self.topo.rank)
        self.layout = {"tensor": self.topo.tensor, "pipeline": self.topo.pipeline, "data": self.dp,
                       "zero_stage": cfg.parallel.zero_stage}
        self.step, self.data_state = 0, self.data.initial_state()
        self._stop_requested = False

    # ---- state ----------------------------------------------------------------------------------

    def _initial_weights(self) -> tuple[Path | None, dict | None]:
        """A weights-only checkpoint (e.g. from `chimera import-hf`) and its full weights, which the model starts
        from instead of its initialisation; (None, None) without one."""
        path = latest_checkpoint(self.run_dir)
        if path is None or not is_weights_only(path):
            return None, None
        if self.topo.rank == 0:
            verify(path)
        saved = read_config(path).model.model_dump(exclude={"name", "preset"})
        if saved != self.cfg.model.model_dump(exclude={"name", "preset"}):
            diff = sorted(k for k, v in saved.items() if self.cfg.model.model_dump().get(k) != v)
            raise UserError(f"the run's model differs from checkpoint {path} in {diff}; use the run.yaml written "
                            "beside it, or another --run-dir")
        return path, torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)

    def resume_if_possible(self) -> bool:
        path = latest_checkpoint(self.run_dir)
        if path is None or self.initialised_from is not None:
            return False
        state = self.checkpointer.load(self.engine, path, self.layout)
        self.step, self.data_state = state["step"], state["data"]
        return True

    def save(self) -> Path:
        state = {"step": self.step, "data": self.data_state, "layout": self.layout}
        return self.checkpointer.save(self.engine, lambda: gathered_full_state_dict(self.engine), self.cfg, state)

    # ---- steps ----------------------------------------------------------------------------------

    def train_step(self) -> tuple[float, dict]:
        """One optimizer step over the global batch; returns its loss (the mean over all ranks) and the data log.

        Each rank runs ``accumulation`` micro-steps of forward and backward on its share of the batch; the
        engine (DeepSpeed, ``managed_gradient_accumulation: false``) keeps their gradients locally, and its
        ``step()`` reduces them over data-parallel ranks, clips, updates the weights and the learning rate."""
        plan = self.data.plan(self.step, self.data_state)  # the global batch of this step (a pure function)
        micro_batches = self.data.micro_batches(plan, self.topo.data_rank, self.dp)  # this rank's share
        assert len(micro_batches) == self.accumulation, (len(micro_batches), self.accumulation)
        losses = []
        for batch in micro_batches:
            loss = self.engine(**{k: v.to(self.device) for k, v in batch.items()})  # forward: mean token loss
            self.engine.backward(loss)  # backward of loss / accumulation, gradients summed over micro-steps
            losses.append(loss.detach())
        self.engine.step()  # the optimizer step: all-reduce over DP, clip, AdamW, LR schedule, zero the gradients
        plan.log["step_tokens"] = sum(b["input_ids"].numel() for b in micro_batches) * self.dp
        self.data_state = plan.next_state
        self.step += 1
        return _mean_over_data_parallel(torch.stack(losses).mean(), self.topo), plan.log

    @torch.no_grad()
    def validation_losses(self) -> dict[str, float]:
        """``val_loss`` (weighted over sources) and ``val_loss/<source>`` when there are several."""
        self.engine.eval()
        t = self.cfg.train
        out = {}
        for i, name in enumerate(self.data.names):
            batches = self.data.validation_batches(i, t.eval_batches, self.topo.data_rank, self.dp, t.micro_batch_size)
            losses = [self.engine(**{k: v.to(self.device) for k, v in b.items()}).detach() for b in batches]
            out[name] = _mean_over_data_parallel(torch.stack(losses).mean(), self.topo)
        self.engine.train()
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
                  f"{self.topo.world_size} process(es) TP={self.topo.tensor} DP={self.dp} "
                  f"ZeRO-{cfg.parallel.zero_stage}, {where}" + self._baseline_text(), flush=True)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

        last_saved = self.step if resumed else None
        val_loss = None
        target = min(t.steps, t.stop_after) if t.stop_after else t.steps  # stop_after: end early, resumable
        while self.step < target:
            lr = self.engine.get_lr()[0]  # the rate this step uses
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
            report = getattr(self.engine.module, "training_metrics", None)
            if report is not None:
                row.update(report())  # model-defined extras (e.g. MoE router losses, expert load)
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
