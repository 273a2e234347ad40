"""The per-rank memory plan of a run: what ``chimera train --dry-run`` prints, before any process starts.

For each pipeline stage, what one of its ranks holds (the model built on the meta device for the layout:
no memory, no process group):

* parameters: the stage's shards (tensor- and expert-parallel slices; the tied embedding and the shared
  blocks a stage uses count on every stage holding a copy), ZeRO-3 partitioned over data x context ranks
  (experts over their expert-data-parallel ranks), each parameter padded to a multiple of them as DeepSpeed does;
* gradients: one per parameter element, in the parameters' precision (the model's ``.grad``), partitioned with
  ZeRO-2 and 3 (DeepSpeed's reduction buckets come on top: ``reduce_bucket_size``);
* optimizer: AdamW's two moments and, where DeepSpeed keeps one apart from the parameters (ZeRO 1-3, bf16),
  an fp32 master copy, all partitioned with ZeRO 1-3;
* activations of one micro-batch: the bytes autograd saves for backward in the stage's forward pass, measured
  by running that forward pass on the meta device (so it is this code's own figure, not a formula; sequence
  parallelism's split is not counted, MoE tokens are taken as spread evenly over experts). A 1F1B schedule
  holds ``min(M, P - stage)`` micro-batches' activations at once on stage ``stage``.

And the pipeline bubble, ``(P - 1) / (M + P - 1)`` for ``M`` micro-batches and ``P`` stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from chimera.configs.schema import RunConfig, accumulation_steps, validate_layout
from chimera.parallel.dims import ParallelDims
from chimera.parallel.pipeline import bubble_fraction, stage_bounds, stage_parts
from chimera.parallel.sharding import expert_dim, held, local_shape

GiB = 1 << 30


@dataclass
class StagePlan:
    stage: int
    layers: tuple[int, int]  # layer units [start, stop)
    parameters: int  # elements of the stage's parameter shards held by one of its ranks (before ZeRO)
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int  # one micro-batch
    in_flight: int  # micro-batches whose activations the stage holds at once

    @property
    def state_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes

    @property
    def peak_bytes(self) -> int:
        return self.state_bytes + self.in_flight * self.activation_bytes


@dataclass
class MemoryPlan:
    world: int
    layout: str
    micro_batches: int
    bubble: float
    stages: list[StagePlan]


def _bytes_per_rank(cfg: RunConfig, shapes: list[tuple[int, bool]], zero_ranks: int, expert_zero_ranks: int
                    ) -> tuple[int, int, int]:
    """(parameter, gradient, optimizer) bytes of one rank holding parameters of ``shapes`` ((elements, is expert))."""
    stage, bf16 = cfg.parallel.zero_stage, cfg.train.precision == "bf16"

    def partition(n: int, expert: bool) -> int:
        return math.ceil(n / (expert_zero_ranks if expert else zero_ranks))

    full = sum(n for n, _ in shapes)
    parts = sum(partition(n, e) for n, e in shapes)
    element = 2 if bf16 else 4
    param_bytes = element * (parts if stage == 3 else full)
    grad_bytes = element * (parts if stage >= 2 else full)
    master = 4 if (bf16 or stage > 0) else 0  # an fp32 copy the optimizer steps, apart from the parameters
    optim_bytes = (8 + master) * (parts if stage > 0 else full)  # the moments (and master) of what this rank steps
    return param_bytes, grad_bytes, optim_bytes


def _activation_bytes(model, cfg: RunConfig, parts: list[str] | None, rows: int, length: int, first: bool,
                      last: bool) -> int:
    """Bytes autograd saves in one micro-batch's forward pass through ``parts`` of ``model`` (on the meta device)."""
    params = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        base = t if t._base is None else t._base
        if id(t) not in params and id(base) not in params:
            saved[id(base)] = max(saved.get(id(base), 0), base.numel() * base.element_size())
        return t

    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    model.to(dtype=dtype)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    model.train()
    layers = [model.layers[int(p.split(".")[1])] for p in parts or [] if p.startswith("layers.")] or None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if first:
            ids = torch.zeros(rows, length, dtype=torch.long, device="meta")
            x, context = model.input_stream(ids)
        else:
            from chimera.models.sublayer import Context

            x = torch.zeros(length, rows, cfg.model.d_model, device="meta", dtype=dtype, requires_grad=True)
            context = Context(embeddings=x)
        x = model.run_layers(x, context, layers)
        if last:
            model.logits_local(x)
    return sum(saved.values())


def memory_plan(cfg: RunConfig, world: int) -> MemoryPlan:
    from chimera.models.causal_lm import CausalLM

    par = cfg.parallel
    dp = validate_layout(cfg, world)
    if cfg.model.byte_latent is not None:
        from chimera.errors import UserError

        raise UserError("chimera plan does not model a byte-latent model's memory (model.byte_latent) yet; "
                        "plan its global model alone by removing model.byte_latent")
    micro = accumulation_steps(cfg.train, dp)
    dims = ParallelDims(tp=par.tensor, ep=par.expert, pp=par.pipeline, sequence_parallel=par.sequence_parallel)
    with torch.device("meta"):
        model = CausalLM(cfg.model, dims).to("meta")
        # activations: the same shards' computation for one rank, experts on one rank (the tokens an expert-parallel
        # rank processes are as many as it routes, when spread evenly)
        runner = CausalLM(cfg.model, ParallelDims(tp=par.tensor, pp=par.pipeline)).to("meta")
    named = dict(model.named_parameters())
    bounds = (stage_bounds(cfg.model, par.pipeline, cfg.data.seq_len) if par.pipeline > 1
              else [(0, len(model.layers))])
    zero_ranks = dp * par.context
    local_length = cfg.data.seq_len // par.context
    stages = []
    for stage, layer_range in enumerate(bounds):
        parts = stage_parts(cfg.model, bounds, stage) if par.pipeline > 1 else None
        names = held(named, parts)
        shapes = [(local_shape(named[n]).numel(), expert_dim(named[n]) is not None) for n in sorted(names)]
        param_b, grad_b, optim_b = _bytes_per_rank(cfg, shapes, zero_ranks, zero_ranks // par.expert)
        activations = _activation_bytes(runner, cfg, parts, cfg.train.micro_batch_size, local_length,
                                        first=stage == 0, last=stage == len(bounds) - 1)
        stages.append(StagePlan(stage, layer_range, sum(n for n, _ in shapes), param_b, grad_b, optim_b,
                                activations, min(micro, par.pipeline - stage)))
    layout = (f"TP={par.tensor} PP={par.pipeline} CP={par.context} DP={dp} EP={par.expert} ZeRO-{par.zero_stage} "
              f"{cfg.train.precision}")
    return MemoryPlan(world, layout, micro, bubble_fraction(par.pipeline, micro), stages)


def human(b: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{int(b)} B"


def format_plan(plan: MemoryPlan, cfg: RunConfig) -> str:
    header = ("stage", "layers", "parameters", "params", "grads", "optimizer", "state", "act/micro", "in flight",
              "peak")
    rows = [header] + [(str(s.stage), f"{s.layers[0]}-{s.layers[1] - 1}", f"{s.parameters:,}",
                        human(s.parameter_bytes), human(s.gradient_bytes), human(s.optimizer_bytes),
                        human(s.state_bytes), human(s.activation_bytes), str(s.in_flight), human(s.peak_bytes))
                       for s in plan.stages]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    table = [" ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    return "\n".join([f"chimera plan: {cfg.model.name}, {plan.world} ranks, {plan.layout}; {plan.micro_batches} "
                      f"micro-batch(es) of {cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens per step per "
                      f"data-parallel rank; pipeline bubble {plan.bubble:.1%}", *table,
                      "per rank of each stage; parameters: its tensor/expert-parallel shards, before ZeRO; peak: "
                      "state + in-flight micro-batches' activations"])
