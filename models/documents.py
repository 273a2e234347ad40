"""Packed documents: where each sequence's documents begin, for mixers that must not cross them.

Built once per forward pass from the loader's ``segment_ids`` and ``position_ids`` (``[b, s]``) and
given to every mixer in the residual stream's ``[s, b]`` order: attention masks other documents
and uses in-document positions for RoPE; recurrences drop their state at ``starts``; temporal
convolutions keep their taps within a document.

Under context parallelism (``chimera.parallel.context``) a mixer sees its rank's chunk of the sequence:
``segment_ids``, ``position_ids`` and ``starts`` are that chunk's (a document starting exactly at the
chunk's first position is a start there), and ``all_segment_ids`` the whole sequence's, for the keys and
halos a mixer receives from earlier chunks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from chimera.parallel.context import local_chunk
from chimera.parallel.dims import SINGLE_PROCESS, ParallelDims


@dataclass(frozen=True)
class PackedDocuments:
    segment_ids: torch.Tensor  # [s, b] document index within the sequence (this chunk)
    position_ids: torch.Tensor  # [s, b] position within the document
    starts: torch.Tensor  # [s, b] bool: first token of a document (not counting a sequence's first token)
    all_segment_ids: torch.Tensor  # [S, b] the whole sequence's segment ids (S = s without context parallelism)
    offset: int = 0  # sequence position of this chunk's first token

    @classmethod
    def from_batch(cls, segment_ids: torch.Tensor, position_ids: torch.Tensor,
                   dims: ParallelDims = SINGLE_PROCESS) -> PackedDocuments:
        """From whole sequences ``[b, S]``; keeps this context-parallel rank's chunk."""
        seg = segment_ids.t().contiguous()
        starts = torch.zeros_like(seg, dtype=torch.bool)
        starts[1:] = seg[1:] != seg[:-1]
        local = local_chunk(seg, dims, 0)
        return cls(local, local_chunk(position_ids.t().contiguous(), dims, 0), local_chunk(starts, dims, 0), seg,
                   dims.cp_rank * local.shape[0])

    @functools.cached_property
    def reach(self) -> int:
        """How far back within its document a token of this chunk sees, at most, counting itself (the largest
        in-document index, plus one): causal attention within documents is a sliding window of ``reach`` positions.
        Computed once per batch (a host sync), for every layer that reads it."""
        within = in_document_positions(self.all_segment_ids)[self.offset: self.offset + self.segment_ids.shape[0]]
        return int(within.max()) + 1

    def preceding_segment_ids(self, n: int) -> torch.Tensor:
        """``[n, b]``: segment ids of the ``n`` positions before this chunk; -1 before the sequence's start."""
        before = self.all_segment_ids[max(0, self.offset - n): self.offset]
        missing = n - before.shape[0]
        if missing:
            before = torch.cat([before.new_full((missing, before.shape[1]), -1), before])
        return before


def in_document_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[S, b]``: each position's distance from its document's first token (documents contiguous)."""
    S = segment_ids.shape[0]
    index = torch.arange(S, device=segment_ids.device)[:, None].expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[1:] = segment_ids[1:] != segment_ids[:-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(0).values
    return index - first
