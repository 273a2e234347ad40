"""The training data path of a run: source -> token streams -> packed samples -> global order -> batches.

``TokenData.train_batch`` is a pure function of (config, loader state, rank): the loader state is
the number of global samples consumed, saved in every checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch

from chimera.configs.schema import DataConfig
from chimera.data.builtin import stdlib_token_streams
from chimera.data.order import GlobalOrder, micro_batch_positions
from chimera.data.packing import PackedSequences
from chimera.data.tokenizers import get_tokenizer
from chimera.errors import UserError


class TokenData:
    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.tokenizer = get_tokenizer(cfg.tokenizer)
        streams = stdlib_token_streams(self.tokenizer, cfg.val_fraction, cfg.include_tests)
        self.streams = streams
        self.train = PackedSequences(streams["train"], cfg.seq_len)
        self.validation = PackedSequences(streams["validation"], cfg.seq_len)
        if len(self.train) == 0 or len(self.validation) == 0:
            raise UserError(
                f"data.seq_len={cfg.seq_len} leaves no training or validation samples "
                f"({len(streams['train'])} / {len(streams['validation'])} tokens); lower it or raise data.val_fraction"
            )
        self.order = GlobalOrder(len(self.train), cfg.seed)

    def train_batch(self, consumed: int, micro_step: int, data_rank: int, data_size: int, micro_batch: int):
        positions = micro_batch_positions(consumed, micro_step, data_rank, data_size, micro_batch)
        return self._tensors(self.train, self.order.samples(positions))

    def validation_batches(self, num_batches: int, data_rank: int, data_size: int, micro_batch: int):
        """The first ``num_batches x data_size x micro_batch`` validation samples (wrapping), this rank's share."""
        for k in range(num_batches):
            start = (k * data_size + data_rank) * micro_batch
            yield self._tensors(self.validation, np.arange(start, start + micro_batch) % len(self.validation))

    @staticmethod
    def _tensors(packed: PackedSequences, indices):
        inputs, labels = packed.batch(indices)
        return torch.from_numpy(inputs), torch.from_numpy(labels)

    def unigram_cross_entropy(self) -> float:
        """Validation loss (nats/token) of the best context-free model: token frequencies of the train split."""
        counts = np.bincount(self.streams["train"], minlength=self.tokenizer.vocab_size).astype(np.float64) + 1
        logp = np.log(counts / counts.sum())
        return float(-logp[self.streams["validation"]].mean())
