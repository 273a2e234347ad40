"""Multi-query associative recall (MQAR), as defined in HazyResearch's Zoology.

Definition followed: ``multiquery_ar`` / ``_mqar`` in ``zoology/data/associative_recall.py``
(Arora, Eyuboglu et al., "Zoology: Measuring and improving recall in efficient language models", 2023).
This is our own numpy implementation of that definition, one sample at a time from a caller's
``np.random.Generator`` (Zoology draws whole data sets from the global numpy seed):

* ``V = vocab_size``, ``L = seq_len``, ``N = num_kv_pairs``, ``C = 2 * N`` (the context size).
* Keys: ``N`` distinct tokens from ``[1, V // 2)`` (token 0 is reserved for the filler);
  values: ``N`` distinct tokens from ``[V // 2, V)``. The two halves are disjoint.
* Context: positions ``0 .. C-1`` hold ``k_1 v_1 k_2 v_2 ... k_N v_N``.
* Queries: the query region ``C .. L-1`` has ``space = (L - C) // 2`` even slots; slot ``g`` is
  position ``C + 2 g``. Every key is queried exactly once; the slots are drawn without replacement
  with probabilities ``p(g) ∝ a * (g + 1) ** (a - 1)`` (a power law, ``a = power_a``; ``a = 1`` is
  uniform, Zoology's default ``a = 0.01`` makes early slots, short gaps, much more likely).
* Labels: ``-100`` everywhere except at a query key's position, whose label is the value paired with
  that key in the context (the next-token target after the key). The value itself is not written
  into the input after the query.
* Every other position of the query region holds the filler token 0; with ``random_non_queries``
  (Zoology's default) every filler is then replaced by a token drawn uniformly from ``[0, V)``.
* Zoology's preconditions are kept: ``L`` even, ``V > L`` and ``4 N <= L``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from chimera.data import IGNORE_INDEX


class MQAR:
    """Multi-query associative recall (Zoology's ``multiquery_ar``), one sample per call.

    Token ids: ``0`` is the filler/pad token (``pad_id``); keys lie in ``[1, vocab_size // 2)``,
    values in ``[vocab_size // 2, vocab_size)``. With ``random_non_queries`` fillers are random tokens
    from the whole vocabulary (they carry label -100). Every sample fills all ``seq_len`` positions.

    Args:
        vocab_size: Zoology's ``vocab_size`` (default 8192).
        seq_len: Zoology's ``input_seq_len`` (default 64), the length of every sample.
        num_kv_pairs: key-value pairs in the context; each key is queried once (default 4).
        power_a: exponent ``a`` of the power law over query slots (default 0.01 as in Zoology).
        random_non_queries: replace the filler 0s by uniform random tokens (default True as in Zoology).
    """

    name: ClassVar[str] = "mqar"
    pad_id: ClassVar[int] = 0

    def __init__(self, vocab_size: int = 8192, seq_len: int = 64, num_kv_pairs: int = 4, power_a: float = 0.01,
                 random_non_queries: bool = True):
        if seq_len % 2 != 0:
            raise ValueError(f"mqar: seq_len must be even (Zoology's definition), got {seq_len}")
        if vocab_size <= seq_len:
            raise ValueError(f"mqar: vocab_size ({vocab_size}) must be larger than seq_len ({seq_len})")
        if num_kv_pairs < 1 or 4 * num_kv_pairs > seq_len:
            raise ValueError(f"mqar: seq_len={seq_len} is too small for num_kv_pairs={num_kv_pairs}: "
                             f"Zoology needs 4 * num_kv_pairs <= seq_len, i.e. seq_len >= {4 * num_kv_pairs}")
        if not power_a > 0:
            raise ValueError(f"mqar: power_a must be positive, got {power_a}")
        self.vocab_size = int(vocab_size)
        self.seq_len = int(seq_len)
        self.num_kv_pairs = int(num_kv_pairs)
        self.power_a = float(power_a)
        self.random_non_queries = bool(random_non_queries)
        self.context_size = 2 * self.num_kv_pairs
        self.num_slots = (self.seq_len - self.context_size) // 2
        half = self.vocab_size // 2
        self.key_range = (1, half)
        self.value_range = (half, self.vocab_size)

    def gap_probabilities(self) -> np.ndarray:
        """Probability of each query slot ``g`` (position ``context_size + 2 g``): ``∝ a (g + 1)^(a - 1)``."""
        g = np.arange(1, self.num_slots + 1, dtype=np.float64)
        p = self.power_a * g ** (self.power_a - 1.0)
        return p / p.sum()

    def build(self, keys: Sequence[int], values: Sequence[int], slots: Sequence[int],
              fillers: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Lays out one instance from given choices: key ``keys[i]`` (paired with ``values[i]``) is
        queried at slot ``slots[i]``. ``fillers`` (one token per non-query position of the query
        region, in order) replaces the 0 fillers when given."""
        n, c = self.num_kv_pairs, self.context_size
        if not len(keys) == len(values) == len(slots) == n:
            raise ValueError(f"mqar: need exactly {n} keys, values and slots")
        inputs = np.zeros(self.seq_len, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        inputs[0:c:2] = keys
        inputs[1:c:2] = values
        positions = c + 2 * np.asarray(slots, dtype=np.int64)
        inputs[positions] = keys
        labels[positions] = values
        if fillers is not None:
            filler_mask = np.ones(self.seq_len, dtype=bool)
            filler_mask[:c] = False
            filler_mask[positions] = False
            inputs[filler_mask] = fillers
        return inputs, labels

    def sample(self, rng: np.random.Generator, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One (inputs, labels) pair of length ``seq_len``. ``length`` may only be None or ``seq_len``
        (an MQAR instance always fills the whole sequence)."""
        if length is not None and length != self.seq_len:
            raise ValueError(f"mqar: every sample has length seq_len={self.seq_len}, got length={length}")
        n = self.num_kv_pairs
        keys = rng.choice(np.arange(*self.key_range), size=n, replace=False)
        values = rng.choice(np.arange(*self.value_range), size=n, replace=False)
        slots = rng.choice(self.num_slots, size=n, replace=False, p=self.gap_probabilities())
        fillers = None
        if self.random_non_queries:
            num_fillers = self.seq_len - self.context_size - n
            fillers = rng.integers(0, self.vocab_size, size=num_fillers)
        return self.build(keys, values, slots, fillers)
