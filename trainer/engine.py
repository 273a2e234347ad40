"""The DeepSpeed engine of a run: ZeRO stage, precision, clipping, accumulation, pipeline stages, experts.

Every run, single process included, trains through here. Models know nothing of DeepSpeed; this module
is the only one that wraps them. ``TrainingEngine`` is what the loop sees: ``train_batch`` (one optimizer
step over this rank's micro-batches), ``eval_loss``, the learning rate, and the model's parameters by
their logical names (``chimera.trainer.checkpoint`` saves and restores through it).

* Without pipeline stages the model is wrapped in DeepSpeed's engine with our topology as its ``mpu``:
  gradients (and ZeRO's partitions) over data x context ranks.
* With stages, the model's pieces (``chimera.parallel.pipeline``) become a DeepSpeed ``PipelineModule`` cut
  where the pattern or the cost model says, run by its 1F1B ``PipelineEngine`` (ZeRO 0 or 1). The input
  embedding (on the first stage, and the last when the head is tied to it) and each shared block (on every
  stage that uses it) are ``TiedLayerSpec``s: one copy per stage holding it, their gradients summed over
  those stages before the optimizer step, so the copies stay equal and the gradient is the sum over uses.
* Expert parameters (expert parallelism) are DeepSpeed MoE parameters on megatron-core's expert groups:
  their gradients are averaged over the expert-data-parallel group, and ZeRO partitions them there.
* Gradient clipping without ZeRO uses the exact global norm (every logical element once: tensor-parallel
  replicas, tied pipeline copies and data-parallel replicas counted once, every expert counted), where
  DeepSpeed's own sums norms of replicated parameters on the first pipeline stage only and averages the
  norms of ranks holding different experts.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
# DeepSpeed JIT-builds a shared-memory all-reduce op on first use; keep its build cache (and build
# lock) inside this environment, so one venv's interrupted build can never block another's.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

import deepspeed  # noqa: E402  (reads DS_ACCELERATOR at import)
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer  # noqa: E402
from deepspeed.pipe import PipelineModule, TiedLayerSpec  # noqa: E402
from deepspeed.runtime.config import DeepSpeedConfig  # noqa: E402
from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402
from deepspeed.runtime.pipe.engine import PipelineEngine  # noqa: E402
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology  # noqa: E402
from deepspeed.utils import groups as deepspeed_groups  # noqa: E402

if os.environ["DS_ACCELERATOR"] == "cpu":
    # On a CPU, DeepSpeed's comm backend JIT-builds a shared-memory all-reduce (two C++ files: ~35 s of one core on the
    # 2-core machine, in every fresh environment) when a process group starts. It serves only
    # ``inference_all_reduce``, which DeepSpeed's own inference tensor parallelism calls and training never does (its
    # collectives are torch.distributed's, over gloo here); marked incompatible, it is not built.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

from chimera.configs.schema import RunConfig  # noqa: E402
from chimera.parallel import pipeline  # noqa: E402
from chimera.parallel.sharding import expert_dim, shard_box, split_dim  # noqa: E402
from chimera.parallel.topology import DeepSpeedMPU, Topology, device  # noqa: E402
from chimera.trainer import optimizer_state  # noqa: E402
from chimera.trainer.optim import build_optimizer, build_schedule  # noqa: E402


def deepspeed_config(cfg: RunConfig, accumulation: int, gradient_ranks: int) -> dict:
    """``accumulation``: micro-batches per optimizer step on each rank (``chimera.configs.schema.accumulation_steps``);
    ``gradient_ranks``: the data x context ranks DeepSpeed averages over (each context-parallel rank holds every
    sequence of its data rank, so in DeepSpeed's accounting the batch counts once per context rank).
    Without stages the loop owns the accumulation boundary: ``backward()`` only accumulates, ``step()`` reduces and
    updates."""
    t, par = cfg.train, cfg.parallel
    # Temporary buffers bounded by ``zero_bucket_size`` elements (DeepSpeed's defaults are a 1 B model's whole size):
    # communication buckets; with ZeRO-3, gathered parameters alive at once (2 buckets) and the optimizer's
    # sub-groups, which bound AdamW's temporaries and the gradient buffer ZeRO-3 fills to create AdamW's state
    # (``ds_numel`` elements of the whole sub-group, not of this rank's partition).
    bucket = par.zero_bucket_size
    zero = {"stage": par.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if par.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0,  # partition every parameter, small ones too
                    stage3_max_live_parameters=2 * bucket, stage3_max_reuse_distance=bucket,
                    stage3_prefetch_bucket_size=bucket, sub_group_size=bucket)
    out = {
        "train_batch_size": t.micro_batch_size * accumulation * gradient_ranks,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if par.pipeline > 1:  # the carried tuple holds several tensors that need gradients: send them whole
        out["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False, "activation_checkpoint_interval": 0}
    else:
        out["managed_gradient_accumulation"] = False
    return out


# ---- the engines ------------------------------------------------------------------------------------------


def global_grad_norm(parameters: Iterable[nn.Parameter], topo: Topology) -> torch.Tensor:
    """The L2 norm of the whole model's gradient (after data-parallel averaging), each logical element once."""
    total = torch.zeros((), dtype=torch.float64)
    replicas = topo.data * topo.context  # ranks holding the same non-expert shard
    expert_replicas = replicas // topo.expert
    for p in parameters:
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):  # tied copies on later stages: counted once
            continue
        if split_dim(p) is None and expert_dim(p) is None and topo.tensor_rank != 0:
            continue  # replicated over tensor-parallel ranks: counted on the first
        sq = p.grad.detach().double().pow(2).sum().cpu()
        total += sq / (expert_replicas if expert_dim(p) is not None else replicas)
    total = total.to(device())
    dist.all_reduce(total)
    return total.sqrt().float()


class UpdateGate:
    """Whether this step's optimizer update happens, decided once per step on every rank alike; and the step's
    gradient norm (before clipping).

    A step is bad when its loss is (``judge``: NaN, infinite, a spike; decided before the update from the loss
    averaged over all ranks) or its gradient norm is not finite. A bad step's update is skipped: the torch
    optimizer's ``step`` and the learning-rate schedule's are not run (DeepSpeed's ZeRO and bf16 optimizers call the
    former after computing the norm, so they still reduce, clip and copy, all of it discarded), so the weights, AdamW's
    moments and step count, and the schedule stay where they were; the gradients are cleared as after any step."""

    def __init__(self, topo: Topology):
        self.topo = topo
        self.judge = lambda loss: None  # the trainer's: loss -> why the step is bad, or None
        self.verdict: str | None = None
        self.grad_norm: float | None = None
        self._checked_norm = False

    def start_step(self) -> None:
        self.verdict, self.grad_norm, self._checked_norm = None, None, False

    def judge_loss(self, loss: float) -> None:
        if self.verdict is None:
            self.verdict = self.judge(loss)

    def install(self, ds) -> None:
        """Wrap the torch optimizer's and the schedule's ``step`` of DeepSpeed engine ``ds``."""
        optimizer, schedule = optimizer_state.base_optimizer(ds), ds.lr_scheduler
        step, schedule_step = optimizer.step, schedule.step

        def gated_step(*args, **kwargs):
            if not self._checked_norm:  # first call of the step (ZeRO-3 steps each sub-group): check the norm
                self._checked_norm = True
                self.grad_norm = self._norm(ds)
                if self.verdict is None and self.grad_norm is not None and not math.isfinite(self.grad_norm):
                    self.verdict = "non-finite gradient norm"
            return None if self.verdict is not None else step(*args, **kwargs)

        def gated_schedule(*args, **kwargs):
            return None if self.verdict is not None else schedule_step(*args, **kwargs)

        optimizer.step, schedule.step = gated_step, gated_schedule

    def _norm(self, ds) -> float | None:
        """The global gradient norm of this step: DeepSpeed's ZeRO/bf16 optimizers have computed it by now; without
        them, the engine's clipping has (``clip_fp32_gradients``), or it is computed here (no clipping)."""
        if ds.optimizer is not optimizer_state.base_optimizer(ds):
            norm = getattr(ds.optimizer, "_global_grad_norm", None)
        else:
            norm = self.grad_norm if self.grad_norm is not None else global_grad_norm(ds.module.parameters(), self.topo)
        return None if norm is None else float(norm)

    def after_update(self, ds) -> None:
        """DeepSpeed's optimizers skip a non-finite norm themselves (their ``overflow``): a bad step too."""
        if getattr(ds.optimizer, "overflow", False) and self.verdict is None:
            self.verdict = "non-finite gradient norm"
        if self.grad_norm is None and ds.get_global_grad_norm() is not None:
            self.grad_norm = float(ds.get_global_grad_norm())


class _ChimeraEngineMixin:
    """What Chimera's models need of a DeepSpeed engine beyond its defaults (``chimera_topology`` and
    ``chimera_gate`` set before ``__init__``)."""

    chimera_topology: Topology
    chimera_gate: UpdateGate

    def _configure_distributed_model(self, model):
        super()._configure_distributed_model(model)
        # DeepSpeed recognises MoE by its own layer class; ours are recognised by their parameters.
        if not self.has_moe_layers and any(is_moe_param(p) for p in model.parameters()):
            self.has_moe_layers = True

    def clip_fp32_gradients(self):  # without ZeRO: the exact global norm
        norm = global_grad_norm(self.module.parameters(), self.chimera_topology)
        self.chimera_gate.grad_norm = float(norm)
        coef = torch.clamp(self.gradient_clipping() / (norm + 1e-6), max=1.0)
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))

    def _take_model_step(self, lr_kwargs):
        self._chimera_before_update()
        super()._take_model_step(lr_kwargs)
        self.chimera_gate.after_update(self)

    def _chimera_before_update(self) -> None:
        pass


class _DataParallelEngine(_ChimeraEngineMixin, DeepSpeedEngine):
    pass


class _PipelineEngine(_ChimeraEngineMixin, PipelineEngine):
    def _chimera_before_update(self) -> None:
        """The loss is known on the last stage only: its mean over micro-batches and data-parallel ranks reaches every
        rank (collective: every rank runs the optimizer-step instruction once per batch) before the verdict."""
        topo = self.chimera_topology
        mine = self.is_last_stage() and topo.tensor_rank == 0 and self.total_loss is not None
        value = torch.tensor([float(self.total_loss.sum()) / self.micro_batches if mine else 0.0, float(mine)],
                             dtype=torch.float64, device=device())
        dist.all_reduce(value)
        self.chimera_gate.judge_loss(value[0].item() / max(value[1].item(), 1.0))


def _construct(engine_cls, topo: Topology, gate: UpdateGate, model, optimizer, schedule, config: dict, mpu):
    """What ``deepspeed.initialize`` does for our two engine classes (it would build DeepSpeed's own)."""
    engine_cls.chimera_topology, engine_cls.chimera_gate = topo, gate
    ds = engine_cls(args=None, model=model, optimizer=optimizer, lr_scheduler=schedule, mpu=mpu,
                    dist_init_required=False, config=config, config_class=DeepSpeedConfig(config, mpu))
    gate.install(ds)
    return ds


def _register_expert_groups(topo: Topology) -> str:
    """Hand megatron-core's expert groups to DeepSpeed under one name; returns the name."""
    name = f"ep_size_{topo.expert}"
    for groups, ranks, group in (
            (deepspeed_groups._EXPERT_PARALLEL_GROUP, deepspeed_groups._EXPERT_PARALLEL_GROUP_RANKS,
             topo.dims().ep_group),
            (deepspeed_groups._EXPERT_DATA_PARALLEL_GROUP, deepspeed_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
             topo.expert_data_group)):
        groups[name] = group
        ranks[name] = dist.get_process_group_ranks(group)
    return name


def _mark_experts(params: Iterable[nn.Parameter], topo: Topology) -> None:
    """Expert-parallel parameters as DeepSpeed MoE parameters: reduced (and ZeRO-partitioned) over their own
    expert-data-parallel group."""
    if topo.expert == 1:
        return
    name = _register_expert_groups(topo)
    for p in params:
        if expert_dim(p) is not None:
            p.allreduce, p.group_name = False, name


def _optimizer(params_module: nn.Module, cfg: RunConfig):
    optimizer = build_optimizer(params_module, cfg.train)
    groups = split_params_into_different_moe_groups_for_optimizer(optimizer.param_groups)
    optimizer.param_groups = [g for g in groups if g["params"]]  # ZeRO wants no empty group
    return optimizer


class _BuiltModule(nn.Module):
    """``TiedLayerSpec`` builds its module from a class; this one gives back a module already built."""

    def __new__(cls, module: nn.Module):
        return module


def _tied(key: str, module: nn.Module, forward_fn) -> TiedLayerSpec:
    return TiedLayerSpec(key, _BuiltModule, module, forward_fn=forward_fn,
                         tied_weight_attr=[name for name, _ in module.named_parameters()])


def _pass_through(module, carried):
    return carried


class _StagedPipeline(PipelineModule):
    """A ``PipelineModule`` cut at the given layer boundaries (``parts``: first layer of each stage, then the end)."""

    def __init__(self, layers, parts: list[int], **kwargs):
        object.__setattr__(self, "_chimera_parts", parts)
        super().__init__(layers, **kwargs)

    def _partition_layers(self, method="uniform"):
        self.parts = list(self._chimera_parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


def pipeline_module(model, cfg: RunConfig, topo: Topology, bounds: list[tuple[int, int]],
                    poisoned=lambda: False) -> PipelineModule:
    """The model as a sequence of pipeline layers: the embedding, each layer unit (each shared block tied in
    before its first use on a stage), the output; cut at ``bounds`` (layer units per stage)."""
    carry = pipeline.Carry(embeddings=model.cfg.style.reads_embeddings, documents=cfg.data.packing == "boundaries")
    units = model.cfg.layer_units()
    layers, parts = [_tied("embed", model.embed, pipeline.input_stage(model, carry))], [0]
    for stage, (start, stop) in enumerate(bounds):
        if stage:
            parts.append(len(layers))
        seen = set()
        for i in range(start, stop):
            block = units[i][0]
            if block in "01" and block not in seen:  # the stage holds a copy of the shared block it uses
                seen.add(block)
                layers.append(_tied(f"shared{block}", model.shared[int(block)], _pass_through))
            layers.append(pipeline.LayerStage(model, i, carry))
    output = pipeline.OutputStage(model, carry)
    if model.head is None:  # tied head: the last stage holds the embedding too
        layers.append(_tied("embed", model.embed, lambda embedding, carried: carried))
    layers.append(output)
    parts.append(len(layers))
    topology = PipeModelDataParallelTopology(num_pp=topo.pipeline, num_mp=topo.tensor,
                                             num_dp=topo.data * topo.context)
    loss = pipeline.pipeline_loss(model, output)

    def loss_fn(outputs, labels):  # a poisoned step (fault injection) turns NaN here, before backward
        return loss(outputs, labels) * (float("nan") if poisoned() else 1.0)

    module = _StagedPipeline(layers, parts, topology=topology, loss_fn=loss_fn, dynamic_shape=True)
    _check_same_groups(module, topo)
    return module


def _check_same_groups(module: PipelineModule, topo: Topology) -> None:
    """DeepSpeed's grid and megatron-core's groups must agree on who is whom (both order tp, then dp x cp, then pp)."""
    grid = module._grid
    ours = {"tensor": dist.get_process_group_ranks(topo.dims().tp_group),
            "data x context": dist.get_process_group_ranks(topo.gradient_group),
            "pipeline": dist.get_process_group_ranks(topo.pipeline_group)}
    theirs = {"tensor": dist.get_process_group_ranks(grid.get_slice_parallel_group()),
              "data x context": dist.get_process_group_ranks(grid.get_data_parallel_group()),
              "pipeline": dist.get_process_group_ranks(grid.get_pipe_parallel_group())}
    if ours != theirs:
        raise RuntimeError(f"DeepSpeed's pipeline grid {theirs} differs from the topology's groups {ours}")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _adopt_process_group() -> None:
    """DeepSpeed's communication layer on our process group (it prints a line each time it loads its CPU
    shared-memory op: kept off the run's output)."""
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.comm.init_distributed(dist_backend=deepspeed.get_accelerator().communication_backend_name(),
                                        dist_init_required=False)


def zero3_partitioner(cfg: RunConfig, topo: Topology):
    """With ZeRO-3, a function that partitions a just-materialised submodule over the data x context ranks at once
    (``build_model(each_part=...)``), so that the whole model never exists on one rank; otherwise None."""
    if cfg.parallel.zero_stage != 3:
        return None
    _adopt_process_group()
    config = deepspeed_config(cfg, 1, topo.data * topo.context)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32

    def partition(module: nn.Module) -> None:
        # in the training precision first: ``zero.Init(module=...)`` partitions parameters as they are (fp32 as
        # drawn), and the engine converts only the empty placeholders then, so bf16 runs would keep fp32 shards
        for p in module.parameters():
            p.data = p.data.to(dtype)
        deepspeed.zero.Init(module=module, data_parallel_group=topo.gradient_group, config_dict_or_path=config,
                            dtype=dtype, mem_efficient_linear=False, mpu=DeepSpeedMPU())

    return partition


class TrainingEngine:
    """The engine the loop drives, with or without pipeline stages."""

    def __init__(self, model, cfg: RunConfig, topo: Topology, accumulation: int, stage_bounds=None):
        self.model, self.cfg, self.topo = model, cfg, topo
        self.pipelined = topo.pipeline > 1
        _adopt_process_group()
        gradient_ranks = topo.data * topo.context
        config = deepspeed_config(cfg, accumulation, gradient_ranks)
        self.gate = UpdateGate(topo)
        self.schedule = build_schedule(cfg.train)
        self.poisoned = False  # fault injection: this step's loss is made NaN before backward
        if self.pipelined:
            wrapped = pipeline_module(model, cfg, topo, stage_bounds, poisoned=lambda: self.poisoned)
            _mark_experts(wrapped.parameters(), topo)
            self.ds = _construct(_PipelineEngine, topo, self.gate, wrapped, _optimizer(wrapped, cfg), self.schedule,
                                 config, wrapped.mpu())
        else:
            _mark_experts(model.parameters(), topo)
            self.ds = _construct(_DataParallelEngine, topo, self.gate, model, _optimizer(model, cfg), self.schedule,
                                 config, DeepSpeedMPU())

    # ---- steps ----------------------------------------------------------------------------------------

    def train_batch(self, micro_batches: list[dict], poisoned: bool = False) -> float:
        """One optimizer step over this rank's micro-batches; the step's loss, averaged over every rank's. Whether the
        update happened, and why not, is ``gate.verdict``; the gradient norm ``gate.grad_norm``. ``poisoned``: the
        loss is made NaN before backward (fault injection)."""
        self.gate.start_step()
        self.poisoned = poisoned
        if self.pipelined:
            return self.ds.train_batch(self._pipeline_batches(micro_batches)).item()
        losses = []
        for batch in micro_batches:
            loss = self.ds(**batch)  # forward: this rank's objective
            if poisoned:
                loss = loss * float("nan")
            self.ds.backward(loss)  # backward of loss / accumulation, gradients summed over micro-steps
            losses.append(loss.detach())
        mean = self._mean_over_ranks(torch.stack(losses).mean())
        self.gate.judge_loss(mean)
        self.ds.step()  # all-reduce over data x context, clip, AdamW, LR schedule, zero the gradients
        return mean

    @torch.no_grad()
    def eval_loss(self, batches: list[dict]) -> float:
        """The language-model loss of ``batches`` (this rank's share of them), averaged over every rank's."""
        self.model.eval()
        self.ds.eval()
        try:
            if self.pipelined:
                return self.ds.eval_batch(self._pipeline_batches(batches), num_micro_batches=len(batches)).item()
            return self._mean_over_ranks(torch.stack([self.ds(**b).detach() for b in batches]).mean())
        finally:
            self.model.train()
            self.ds.train()

    def _pipeline_batches(self, micro_batches: list[dict]):
        """DeepSpeed's pipeline input: ``(inputs, labels)`` per micro-batch, inputs as the first stage takes them."""
        def item(b):
            inputs = (b["input_ids"],) + ((b["segment_ids"], b["position_ids"]) if "segment_ids" in b else ())
            return (inputs if len(inputs) > 1 else inputs[0]), b["labels"]

        return iter([item(b) for b in micro_batches])

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        value = value.detach().float().clone()
        dist.all_reduce(value, group=self.topo.gradient_group)
        return value.item() / (self.topo.data * self.topo.context)

    # ---- state ----------------------------------------------------------------------------------------

    def get_lr(self) -> float:
        return self.ds.get_lr()[0]

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """This rank's parameters (its pipeline stage's), by their logical names (the model's)."""
        return {name: p for name, p in self.model.named_parameters() if not p.is_meta}

    def full_shapes(self) -> dict:
        """Every parameter's full shape, by logical name (every stage's)."""
        return self.model.full_shapes()

    def held_bytes(self) -> dict[str, int]:
        """Bytes this rank holds of parameters (its shards; ZeRO-3: its partitions) and optimizer state (AdamW's
        moments, and the fp32 master tensors it steps when they are not the parameters themselves)."""
        params = list(self.named_parameters().values())
        optimizer = optimizer_state.base_optimizer(self.ds)
        stepped = optimizer_state.stepped_tensors(self.ds)
        ours = {id(p) for p in params}
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
        return {"parameters": sum(_nbytes(getattr(p, "ds_tensor", p)) for p in params),
                "optimizer": sum(map(_nbytes, state)) + sum(_nbytes(t) for t in stepped if id(t) not in ours)}

    def optimizer_steps(self) -> int:
        return optimizer_state.steps_taken(self.ds)

    def pieces(self):
        """What this rank writes to a checkpoint: ``(name, shard box, flat start, flat stop, {kind: 1-D tensor})``
        for each fragment it holds of master weights and moments, each logical element written by one rank."""
        if not optimizer_state.base_optimizer(self.ds).state:  # no step yet: AdamW's state is what it would start at
            optimizer_state.create_state(self.ds, 0)
        optimizer_state.link_state(self.ds)
        dims = self.model.dims
        for index, f in enumerate(optimizer_state.fragments(self.ds, self.named_parameters())):
            if self._writes(f, index):
                tensors = {"model": f.master(), **{k: f.moment(k) for k in optimizer_state.MOMENTS}}
                yield f.name, shard_box(f.param, dims), f.start, f.stop, tensors

    def _writes(self, fragment: optimizer_state.Fragment, index: int) -> bool:
        """Whether this rank writes ``fragment``: not a tensor-parallel or tied-pipeline copy of another rank's, and
        without ZeRO, one data-parallel replica per parameter (spread over the replicas)."""
        p = fragment.param
        if getattr(p, "ds_pipe_replicated", False):
            return False
        if split_dim(p) is None and expert_dim(p) is None and self.topo.tensor_rank != 0:
            return False
        if not fragment.replicated:
            return True
        group = self.topo.expert_data_group if expert_dim(p) is not None else self.topo.gradient_group
        return index % dist.get_world_size(group) == dist.get_rank(group)

    def load_optimizer(self, reader, steps: int) -> None:
        """Master weights and moments of this rank's fragments from a checkpoint's store (any layout wrote it); the
        optimizer's step count and the learning-rate schedule at ``steps``."""
        optimizer_state.create_state(self.ds, steps)
        dims = self.model.dims
        with torch.no_grad():
            for f in optimizer_state.fragments(self.ds, self.named_parameters()):
                box = shard_box(f.param, dims)
                master = reader.read_flat(f"model/{f.name}", box, f.start, f.stop)
                f.master().copy_(master)
                for kind in optimizer_state.MOMENTS:
                    f.moment(kind).copy_(reader.read_flat(f"{kind}/{f.name}", box, f.start, f.stop))
                if hasattr(f.param, "ds_tensor"):  # ZeRO-3: the model's own partition too
                    f.param.ds_tensor.data[: f.stop - f.start].copy_(master)
        schedule = self.ds.lr_scheduler
        schedule.last_epoch, schedule._step_count = steps, steps + 1
        rates = [base * rule(steps) for base, rule in zip(schedule.base_lrs, schedule.lr_lambdas)]
        for group, rate in zip(schedule.optimizer.param_groups, rates):
            group["lr"] = rate
        schedule._last_lr = rates
        self.ds.global_steps = steps

    def training_metrics(self) -> dict:
        """What the model's sublayers report beyond the loss (e.g. MoE expert load), from every pipeline stage."""
        mine = self.model.training_metrics()
        if not self.pipelined:
            return mine
        everyone = [None] * self.topo.pipeline
        dist.all_gather_object(everyone, mine, group=self.topo.pipeline_group)
        return {k: v for stage in everyone for k, v in stage.items()}
