"""Deterministic generators for synthetic sequence tasks (numpy only).

Every task has ``name``, ``vocab_size``, ``seq_len`` and ``sample(rng, length=None) -> (inputs,
labels)``: two int64 arrays of exactly ``seq_len``, where ``labels[t]`` is the target for the token
after position ``t`` on supervised positions and ``IGNORE_INDEX`` (-100) elsewhere.

* ``mqar``: multi-query associative recall of Zoology (``chimera.data.synthetic.mqar``).
* The Chomsky-hierarchy tasks of Deletang et al. 2023 (``chimera.data.synthetic.chomsky``).

``sample_at(task, seed, index)`` makes sample ``index`` a pure function of ``(seed, index)``, which is
what exact resumption relies on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from chimera.data.synthetic.chomsky import (
    CHOMSKY_TASKS,
    BinaryAddition,
    ChomskyTask,
    CycleNavigation,
    DuplicateString,
    EvenPairs,
    ModularArithmetic,
    OddsFirst,
    ParityCheck,
    ReverseString,
    StackManipulation,
)
from chimera.data.synthetic.mqar import IGNORE_INDEX, MQAR

__all__ = [
    "IGNORE_INDEX", "TASKS", "make_task", "sample_at", "MQAR", "ChomskyTask", "ParityCheck", "EvenPairs",
    "CycleNavigation", "ModularArithmetic", "ReverseString", "StackManipulation", "DuplicateString", "OddsFirst",
    "BinaryAddition",
]

TASKS: dict[str, type] = {MQAR.name: MQAR, **CHOMSKY_TASKS}


def make_task(name: str, **kwargs: Any):
    """Builds the task registered under ``name`` with the class's keyword arguments."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown synthetic task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
    return cls(**kwargs)


def sample_at(task, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``index`` of the stream with ``seed``: ``task.sample`` on ``np.random.default_rng([seed, index])``."""
    return task.sample(np.random.default_rng([seed, index]))
