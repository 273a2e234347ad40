"""Packed documents: where each sequence's documents begin, for mixers that must not cross them.

Built once per forward pass from the loader's ``segment_ids`` and ``position_ids`` (``[b, s]``) and
given to every mixer in the residual stream's ``[s, b]`` order: attention masks other documents
and uses in-document positions for RoPE; recurrences drop their state at ``starts``; temporal
convolutions keep their taps within a document.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedDocuments:
    segment_ids: torch.Tensor  # [s, b] document index within the sequence
    position_ids: torch.Tensor  # [s, b] position within the document
    starts: torch.Tensor  # [s, b] bool: first token of a document (not counting a sequence's first token)

    @classmethod
    def from_batch(cls, segment_ids: torch.Tensor, position_ids: torch.Tensor) -> PackedDocuments:
        seg = segment_ids.t().contiguous()
        starts = torch.zeros_like(seg, dtype=torch.bool)
        starts[1:] = seg[1:] != seg[:-1]
        return cls(seg, position_ids.t().contiguous(), starts)
