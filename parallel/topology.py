"""Process topology: torch.distributed + megatron-core ``parallel_state`` (TP x PP x DP).

Every training run goes through here, a single process included (a 1-rank gloo group), so there is
one code path. ``Topology.dims`` is the ``ParallelDims`` a model is built for: the only way process
groups reach model code. ``DeepSpeedMPU`` adapts ``parallel_state`` to the ``mpu`` interface
DeepSpeed expects.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from chimera.parallel.cpu_compat import enable_cpu_fallback
from chimera.parallel.dims import ParallelDims


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    tensor: int
    pipeline: int
    data: int
    tensor_rank: int
    data_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def dims(self, sequence_parallel: bool = False) -> ParallelDims:
        """The parallel dimensions of this rank's model."""
        return ParallelDims(tp=self.tensor, tp_rank=self.tensor_rank, tp_group=ps.get_tensor_model_parallel_group(),
                            sequence_parallel=sequence_parallel and self.tensor > 1, pp=self.pipeline,
                            pp_rank=ps.get_pipeline_model_parallel_rank())

    @property
    def data_group(self) -> dist.ProcessGroup:
        return ps.get_data_parallel_group()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _init_process_group() -> None:
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(minutes=int(os.environ.get("CHIMERA_DIST_TIMEOUT_MIN", "30")))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    else:  # one process, no launcher: an in-memory store
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asks every process for it
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def initialize(tensor: int = 1, pipeline: int = 1) -> Topology:
    """Create (or reuse) the process groups; return this rank's place in them."""
    enable_cpu_fallback()
    _init_process_group()
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) != (
            tensor,
            pipeline,
        ):
            ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline)
    return current()


def current() -> Topology:
    return Topology(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tensor=ps.get_tensor_model_parallel_world_size(),
        pipeline=ps.get_pipeline_model_parallel_world_size(),
        data=ps.get_data_parallel_world_size(),
        tensor_rank=ps.get_tensor_model_parallel_rank(),
        data_rank=ps.get_data_parallel_rank(),
    )


def shutdown() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class DeepSpeedMPU:
    """The ``mpu`` object DeepSpeed asks for, answered from megatron-core's parallel_state.

    DeepSpeed reduces gradients over the data-parallel group and computes gradient norms over the
    model-parallel group; parallel_state names these differently and lacks the ``model_parallel``
    aliases, hence this adapter.
    """

    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
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
