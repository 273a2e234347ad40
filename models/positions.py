"""Decoding positions: one for the whole batch (``int``), or each row's own (``LongTensor [b]``).

A batch whose rows are at different positions (prompts of different lengths, requests joining a running batch) steps
together through the mixers that declare ``ROW_POSITIONS = True``: their ``step(x, state, pos)`` takes either form.
Every state tensor of such a mixer has a batch dimension, so rows can be taken out of a state and stacked into one.
"""

from __future__ import annotations

import torch


def at_start(pos: int | torch.SymInt | torch.Tensor) -> bool:
    """Whether a decoding step is at position 0 (a recurrence starts there): all rows at 0, or none; a batch mixing
    the two is refused (step those rows apart)."""
    if not isinstance(pos, torch.Tensor):  # an int, or a symbolic one (torch.export of a decode step: ONNX)
        return pos == 0
    starts = pos == 0
    if bool(starts.any()) and not bool(starts.all()):
        raise ValueError("a decoding step with some rows at position 0 and others later: step those rows apart")
    return bool(starts.all())


def row_positions(pos: int | torch.Tensor, batch: int, device=None) -> torch.Tensor:
    """``pos`` as each row's position, ``LongTensor [batch]``."""
    return torch.as_tensor(pos, dtype=torch.long, device=device).expand(batch)
