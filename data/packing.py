"""Packing a token stream into fixed-length training samples.

Sample ``i`` is the window ``stream[i L : i L + L + 1]``: inputs are its first ``L`` tokens and
labels its last ``L`` (next-token targets). Documents run across sample boundaries, separated by
the tokenizer's separator token.
"""

from __future__ import annotations

import numpy as np


class PackedSequences:
    def __init__(self, stream: np.ndarray, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        self.num_samples = max(0, (len(stream) - 1) // seq_len)

    def __len__(self) -> int:
        return self.num_samples

    def window(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return self.stream[start : start + self.seq_len + 1]

    def batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """``(inputs, labels)`` of shape ``[len(indices), L]`` (int64)."""
        windows = np.stack([self.window(int(i)) for i in indices]).astype(np.int64)
        return windows[:, :-1], windows[:, 1:]
