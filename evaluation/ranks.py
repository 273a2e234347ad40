"""Evaluation on several ranks (``chimera eval --nproc N``): a data-parallel split of the evaluated batches.

Every rank builds the same list of batches (the eval streams are seeded, not drawn from a shared iterator) and
computes the ones whose index is its rank modulo the world size (``mine``); the sums a result is made of (losses in
nats, positions, correct positions, accuracies summed over rows) are then added over the ranks (``sum_over_ranks``),
so every rank holds the whole result and rank 0 prints and writes it. The batches are the one-process run's, so
the result equals it up to the order of floating-point additions. With no process group both are the identity.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mine(items: Iterable) -> Iterator:
    """The items (batches) this rank computes: every world-size-th one, from its rank on."""
    rank, world = _world()
    for i, item in enumerate(items):
        if i % world == rank:
            yield item


def sum_over_ranks(values: list[float]) -> list[float]:
    """``values`` summed element-wise over the ranks (fp64)."""
    if _world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def is_main() -> bool:
    return _world()[0] == 0


def join_ranks() -> None:
    """Join the process group the launcher's environment describes (gloo: only a few sums cross the ranks)."""
    dist.init_process_group("gloo")
