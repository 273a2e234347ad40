"""The parallel dimensions a model is built for: one small object, handed to every layer that splits.

Model code never reads process-group globals: a layer learns its tensor-parallel size, rank and
group (and, as they arrive, its pipeline stage, context- and expert-parallel place) from the
``ParallelDims`` it is given. ``chimera.parallel.topology`` builds it once per run from the process
groups; ``ParallelDims()`` is one process with nothing split, which needs no process group at all
(parameter counts, HF import/export, inference).

A ``ParallelDims`` with ``tp > 1`` but no ``tp_group`` is one rank of a split *emulated* in one
process: shards have that rank's shapes and every collective is the identity (the caller combines
the ranks' results itself, as tests do). Context and expert parallelism always need their groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    tp: int = 1  # tensor-parallel size
    tp_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    sequence_parallel: bool = False  # the residual stream is split over the tensor-parallel ranks along s
    pp: int = 1  # pipeline stages (this rank's stage: pp_rank)
    pp_rank: int = 0
    cp: int = 1  # context parallel: ranks a sequence is split over (chimera.parallel.context)
    cp_rank: int = 0
    cp_group: dist.ProcessGroup | None = None
    ep: int = 1  # expert parallel: ranks the experts of one MoE layer are spread over
    ep_rank: int = 0
    ep_group: dist.ProcessGroup | None = None

    def __post_init__(self):
        for size, rank, name in ((self.tp, self.tp_rank, "tp"), (self.pp, self.pp_rank, "pp"),
                                 (self.cp, self.cp_rank, "cp"), (self.ep, self.ep_rank, "ep")):
            if not 0 <= rank < size:
                raise ValueError(f"{name}_rank={rank} is not a rank of {name}={size}")
        if self.sequence_parallel and self.tp == 1:
            object.__setattr__(self, "sequence_parallel", False)  # nothing to split the sequence over

    def local(self, n: int, what: str = "size") -> int:
        """This rank's share of ``n`` things split over the tensor-parallel ranks."""
        if n % self.tp:
            raise ValueError(f"tensor-parallel size {self.tp} does not divide {what}={n}")
        return n // self.tp

    def local_experts(self, n: int) -> int:
        """This rank's share of ``n`` experts split over the expert-parallel ranks."""
        if n % self.ep:
            raise ValueError(f"expert-parallel size {self.ep} does not divide the {n} experts")
        return n // self.ep

    @property
    def communicates(self) -> bool:
        """Whether tensor-parallel collectives run (a real group of more than one rank)."""
        return self.tp > 1 and self.tp_group is not None


SINGLE_PROCESS = ParallelDims()  # one process, nothing split, no process group
