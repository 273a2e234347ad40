"""Task heads on a model's per-position features ``[b, s, d]`` (any model with ``features(input_ids)``).

* ``sequence_classification``: mean of the positions' features -> linear -> class logits ``[b, C]``;
* ``regression``: mean of the positions' features -> linear -> one value ``[b]``;
* ``token_classification``: each position's features -> linear -> class logits ``[b, s, C]``, one per input token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("sequence_classification", "token_classification", "regression")


class TaskHead(nn.Module):
    def __init__(self, kind: str, d_model: int, num_classes: int = 1):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"task kind {kind!r}; one of {KINDS}")
        self.kind = kind
        self.proj = nn.Linear(d_model, 1 if kind == "regression" else num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.kind == "token_classification":
            return self.proj(features)  # [b, s, C]
        out = self.proj(features.mean(dim=1))  # [b, C] (regression: [b, 1])
        return out[:, 0] if self.kind == "regression" else out

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.kind == "regression":
            return F.mse_loss(output, labels.to(output.dtype))
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), labels.reshape(-1))

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return output if self.kind == "regression" else output.argmax(-1)
