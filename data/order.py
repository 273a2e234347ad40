"""The global sample order and each rank's slice of it.

The run consumes global sample positions ``0, 1, 2, ...``; position ``p`` is sample
``perm_e[p mod N]`` of epoch ``e = p // N``, where ``perm_e`` is a permutation drawn from
``(seed, e)``. The order is thus a pure function of (seed, epoch, dataset), and the only loader
state is ``consumed``, the number of positions used so far.

An optimizer step of ``G`` global samples is laid out as ``[accumulation micro-step][data rank]
[sample]``. Changing the number of data-parallel ranks between runs changes who reads a sample,
never which samples a step reads.
"""

from __future__ import annotations

import numpy as np


class GlobalOrder:
    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        if num_samples <= 0:
            raise ValueError("dataset has no samples")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self._cached: tuple[int, np.ndarray] | None = None  # the last epoch's permutation

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            perm = np.arange(self.num_samples)
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._cached = (epoch, perm)
        return self._cached[1]

    def samples(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty_like(positions)
        for epoch in np.unique(positions // self.num_samples):
            sel = positions // self.num_samples == epoch
            out[sel] = self._permutation(int(epoch))[positions[sel] % self.num_samples]
        return out


def micro_batch_positions(consumed: int, micro_step: int, data_rank: int, data_size: int,
                          micro_batch: int) -> np.ndarray:
    """Global positions read by one rank in one accumulation micro-step of the step starting at ``consumed``."""
    start = consumed + (micro_step * data_size + data_rank) * micro_batch
    return np.arange(start, start + micro_batch)
