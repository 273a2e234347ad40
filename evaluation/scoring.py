"""Scores of a batch: summed next-token loss, and exact-match accuracy on the supervised positions.

``labels[b, t]`` is the target of position ``t`` (already shifted, as the data pipeline and the synthetic tasks
give it); ``IGNORE_INDEX`` marks positions that are not scored. A position is correct when the argmax of its
logits over the whole vocabulary is its label: Zoology's per-query exact match for MQAR (``preds ==
targets`` where ``targets != -100``), and per-output-token accuracy for the Chomsky tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chimera.data import IGNORE_INDEX


@dataclass
class Tally:
    """Sums over scored positions: loss in nats, positions, correct positions."""

    loss_nats: float = 0.0
    positions: int = 0
    correct: int = 0

    def add(self, other: Tally) -> None:
        self.loss_nats += other.loss_nats
        self.positions += other.positions
        self.correct += other.correct

    def over_ranks(self) -> Tally:
        """This tally summed over the evaluation's ranks (``chimera.evaluation.ranks``)."""
        from chimera.evaluation.ranks import sum_over_ranks

        loss, positions, correct = sum_over_ranks([self.loss_nats, self.positions, self.correct])
        return Tally(loss, int(positions), int(correct))

    @property
    def loss(self) -> float:
        return self.loss_nats / self.positions if self.positions else float("nan")

    @property
    def accuracy(self) -> float:
        return self.correct / self.positions if self.positions else float("nan")


def score(logits: torch.Tensor, labels: torch.Tensor, unscored: tuple[int, ...] = ()) -> Tally:
    """The tally of ``logits [b, t, V]`` against ``labels [b, t]``; labels in ``unscored`` (besides
    ``IGNORE_INDEX``) are left out of the accuracy and the loss alike."""
    mask = labels != IGNORE_INDEX
    for token in unscored:
        mask &= labels != token
    picked = logits[mask].double()
    targets = labels[mask]
    loss = F.cross_entropy(picked, targets, reduction="sum").item() if targets.numel() else 0.0
    correct = int((picked.argmax(-1) == targets).sum().item())
    return Tally(loss_nats=loss, positions=int(targets.numel()), correct=correct)


def per_row_accuracy(logits: torch.Tensor, labels: torch.Tensor, unscored: tuple[int, ...] = ()) -> list[float | None]:
    """Each row's fraction of correct scored positions (None for a row with none)."""
    mask = labels != IGNORE_INDEX
    for token in unscored:
        mask &= labels != token
    hits = (logits.argmax(-1) == labels) & mask
    counts, right = mask.sum(1).tolist(), hits.sum(1).tolist()
    return [r / c if c else None for r, c in zip(right, counts)]


@torch.no_grad()
def model_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, t, V]`` of a batch (the model in eval mode, no gradients)."""
    return model(input_ids)
