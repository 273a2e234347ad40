"""Process topology: torch.distributed + megatron-core ``parallel_state`` (TP x CP x DP x PP, EP inside DP x CP).

Every training run goes through here, a single process included (a 1-rank gloo group), so there is
one code path. ``Topology.dims`` is the ``ParallelDims`` a model is built for: the only way process
groups reach model code. ``DeepSpeedMPU`` adapts ``parallel_state`` to the ``mpu`` interface
DeepSpeed expects.

Rank order is megatron-core's default, ``tp-cp-ep-dp-pp``: tensor-parallel ranks are adjacent, then
context-parallel, then data-parallel, pipeline stages outermost::

    rank = tp + T (cp + C (dp + D pp))

Expert parallelism is carved from the data x context ranks of one tensor-parallel rank (megatron-core's
expert groups: ``E`` consecutive such ranks hold the experts of one MoE layer between them; the
``D C / E`` ranks holding the same experts form the expert-data-parallel group). Gradients of
everything but experts are averaged over data x context ranks (each context-parallel rank sees part of
each sequence), those of experts over their expert-data-parallel group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from megatron.core import parallel_state as ps

from chimera.parallel.cpu_compat import enable_cpu_fallback
from chimera.parallel.dims import ParallelDims


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    tensor: int
    pipeline: int
    context: int
    expert: int
    data: int  # data-parallel size: replicas of the model that read different sequences
    tensor_rank: int
    pipeline_rank: int
    context_rank: int
    expert_rank: int
    data_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def dims(self, sequence_parallel: bool = False) -> ParallelDims:
        """The parallel dimensions of this rank's model."""
        return ParallelDims(tp=self.tensor, tp_rank=self.tensor_rank, tp_group=ps.get_tensor_model_parallel_group(),
                            sequence_parallel=sequence_parallel and self.tensor > 1, pp=self.pipeline,
                            pp_rank=self.pipeline_rank, cp=self.context, cp_rank=self.context_rank,
                            cp_group=ps.get_context_parallel_group(), ep=self.expert, ep_rank=self.expert_rank,
                            ep_group=ps.get_expert_model_parallel_group())

    @property
    def data_group(self) -> dist.ProcessGroup:
        """The ranks that hold the same model shard and the same part of each sequence, reading different
        sequences."""
        return ps.get_data_parallel_group()

    @property
    def gradient_group(self) -> dist.ProcessGroup:
        """The ranks over which gradients (but experts') and losses are averaged: data x context parallel."""
        return ps.get_data_parallel_group(with_context_parallel=True)

    @property
    def pipeline_group(self) -> dist.ProcessGroup:
        return ps.get_pipeline_model_parallel_group()

    @property
    def expert_data_group(self) -> dist.ProcessGroup:
        """The ranks holding the same experts (their gradients are averaged over these)."""
        return ps.get_expert_data_parallel_group()

    def describe(self) -> str:
        parts = [f"{name}={size}" for name, size in (("TP", self.tensor), ("PP", self.pipeline), ("CP", self.context),
                                                    ("DP", self.data), ("EP", self.expert)) if size > 1]
        return " x ".join(parts) if parts else "one process"


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _init_process_group(timeout_s: float | None = None) -> None:
    """The default process group; a collective waits ``timeout_s`` seconds for the other ranks (``parallel.timeout``)
    before it fails, so a dead rank ends the run instead of hanging it."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else 1800)
    # the groups made later (megatron-core's get it explicitly; DeepSpeed's pipeline grid does not) wait as long
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    else:  # one process, no launcher: an in-memory store
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asks every process for it
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def _sizes() -> tuple[int, int, int, int]:
    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_context_parallel_world_size(), ps.get_expert_model_parallel_world_size())


def initialize(tensor: int = 1, pipeline: int = 1, context: int = 1, expert: int = 1,
               timeout_s: float | None = None) -> Topology:
    """Create (or reuse) the process groups; return this rank's place in them."""
    enable_cpu_fallback()
    _init_process_group(timeout_s)
    if ps.model_parallel_is_initialized() and _sizes() != (tensor, pipeline, context, expert):
        ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
                                     context_parallel_size=context, expert_model_parallel_size=expert,
                                     create_gloo_process_groups=False,
                                     distributed_timeout_minutes=c10d.default_pg_timeout.total_seconds() / 60)
    return current()


def current() -> Topology:
    return Topology(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tensor=ps.get_tensor_model_parallel_world_size(),
        pipeline=ps.get_pipeline_model_parallel_world_size(),
        context=ps.get_context_parallel_world_size(),
        expert=ps.get_expert_model_parallel_world_size(),
        data=ps.get_data_parallel_world_size(),
        tensor_rank=ps.get_tensor_model_parallel_rank(),
        pipeline_rank=ps.get_pipeline_model_parallel_rank(),
        context_rank=ps.get_context_parallel_rank(),
        expert_rank=ps.get_expert_model_parallel_rank(),
        data_rank=ps.get_data_parallel_rank(),
    )


def shutdown() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class DeepSpeedMPU:
    """The ``mpu`` object DeepSpeed asks for, answered from megatron-core's parallel_state.

    DeepSpeed reduces gradients (and partitions ZeRO state) over what it calls the data-parallel group and
    computes gradient norms over the model-parallel group; parallel_state names these differently and lacks
    the ``model_parallel`` aliases, hence this adapter. DeepSpeed's data-parallel group is our data x context
    group: context-parallel ranks hold the same weights and each computes part of their gradient.
    """

    @staticmethod
    def get_data_parallel_group():
        return ps.get_data_parallel_group(with_context_parallel=True)

    @staticmethod
    def get_data_parallel_rank():
        return ps.get_data_parallel_rank(with_context_parallel=True)

    @staticmethod
    def get_data_parallel_world_size():
        return ps.get_data_parallel_world_size(with_context_parallel=True)
    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)

    @staticmethod
    def get_model_parallel_rank() -> int:
        return dist.get_rank(group=ps.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return dist.get_world_size(group=ps.get_model_parallel_group())
