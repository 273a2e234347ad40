"""Byte patches for the byte-latent model (BLT, Pagnoni et al., arXiv 2412.09871, Sec. 2): where patches begin,
which patch each byte belongs to, and which finished patch each byte's prediction may read.

A patch closes after byte ``t`` (a new one begins at ``t + 1``) when ``closes_t`` holds, decided from bytes ``<= t``:

* ``entropy`` (BLT's global-threshold rule, Sec. 2.3): the entropy model's next-byte entropy
  ``H(x_{t+1} | x_{<=t}) = - sum_v p(v | x_{<=t}) log p(v | x_{<=t})`` (nats) exceeds ``entropy_threshold``;
* ``stride`` (the fixed-size fallback, Sec. 2.1): the in-document position ``t + 1`` is a multiple of ``stride``.

With entropy patching, ``max_patch_length`` (0: none) also closes a patch where the in-document position ``t + 1`` is
a multiple of it, so no patch is longer: DNA is close to its alphabet's maximum entropy (ln 4) everywhere, and a
threshold alone would cut it into either single bytes or whole documents. The cap is aligned to positions, not to
the patch's start, so that it stays a function of each byte alone (no scan over the sequence).

A document's first byte always begins a patch, so patches never span documents. With ``starts_t`` (byte ``t``
begins a patch) the patch of byte ``t`` is ``index_t = sum_{u <= t} starts_u - 1``.

Causality: the global model's output for patch ``j`` depends on all its bytes, so byte ``t`` may read it only once
the patch has closed at or before ``t``: byte ``t`` reads patch ``index_t`` when ``closes_t`` (it is the patch's last
byte, known from bytes ``<= t``), else ``index_t - 1``; none (``-1``) when that patch lies in an earlier document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from chimera.configs.section import Section

SEQUENCE_TYPES = ("dna", "rna", "protein")


class ByteLatentConfig(Section):
    """``model.byte_latent:``: the model runs on bytes, its layer pattern (``model.pattern``, at ``model.d_model``)
    being the global model over patches."""

    patching: Literal["entropy", "stride"] = Field("entropy", description="where patches begin: entropy or stride")
    entropy_threshold: float = Field(1.0, gt=0, description="next-byte entropy (nats) above which a patch begins")
    stride: int = Field(4, ge=1, description="bytes per patch with patching: stride")
    max_patch_length: int = Field(0, ge=0, description="with patching: entropy, also close a patch at every "
                                  "multiple of this in-document position (0: no cap)")
    entropy_model: dict[str, Any] = Field(
        default_factory=dict, description="model fields of the entropy model (a small byte LM) that differ from "
        "the global model's; default d_model 32, pattern 'H-', num_layers 2")
    local_model: dict[str, Any] = Field(
        default_factory=dict, description="model fields of the local encoder and decoder that differ from the "
        "global model's (their pattern is cycled to encoder_layers + decoder_layers); default d_model 32, pattern 'H-'")
    encoder_layers: int = Field(2, ge=1, description="sublayers of the local encoder")
    decoder_layers: int = Field(2, ge=1, description="sublayers of the local decoder")
    entropy_loss_weight: float = Field(1.0, ge=0, description="weight of the entropy model's own next-byte loss")
    sequence_type: Literal[SEQUENCE_TYPES] = Field("dna", description="the type embedding used when none is given")
    token_merging: bool = Field(False, description="merge similar neighbouring patches between global blocks "
                                "(chimera.models.token_merging)")
    merge_after: int | None = Field(None, ge=0, description="global sublayers before the merge (default: half)")
    merge_threshold: float = Field(0.9, ge=-1, le=1, description="cosine similarity above which neighbours merge")
    merge_max_ratio: float = Field(0.5, ge=0, le=0.5, description="at most this fraction of patches merged away")
    merge_learned: bool = Field(False, description="learn the merge threshold (straight-through gate)")


def next_byte_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` next-byte logits -> their distribution's entropy ``[...]`` in nats (in fp32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def closes_patch(cfg: ByteLatentConfig, entropy: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
    """``closes_t`` ``[b, s]`` (bool): a patch ends at byte ``t``, from the next-byte entropy at ``t`` ``[b, s]``
    (``next_byte_entropy`` of the entropy model's logits; entropy patching) and the in-document positions ``[b, s]``."""
    if cfg.patching == "stride":
        return (positions + 1) % cfg.stride == 0
    closes = entropy > cfg.entropy_threshold
    if cfg.max_patch_length:
        closes |= (positions + 1) % cfg.max_patch_length == 0
    return closes


@dataclass(frozen=True)
class Patches:
    """The patches of a batch of byte sequences ``[b, s]``; ``P`` = the most patches of any row."""

    starts: torch.Tensor  # [b, s] bool: the byte begins a patch
    index: torch.Tensor  # [b, s] the patch of each byte (0 .. count - 1)
    reads: torch.Tensor  # [b, s] the finished patch each byte's prediction reads, -1 for none
    count: torch.Tensor  # [b] patches per row
    segment_ids: torch.Tensor  # [b, P] the document of each patch (rows' unused patches: a document of their own)
    position_ids: torch.Tensor  # [b, P] the patch's position within its document

    @property
    def length(self) -> int:
        return self.segment_ids.shape[1]


def segment(closes: torch.Tensor, segment_ids: torch.Tensor | None = None) -> Patches:
    """Patches from ``closes`` ``[b, s]`` and the documents ``segment_ids`` ``[b, s]`` (None: one per row)."""
    b, s = closes.shape
    seg = torch.zeros_like(closes, dtype=torch.long) if segment_ids is None else segment_ids.long()
    doc_start = torch.ones_like(closes)
    doc_start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    starts = doc_start.clone()
    starts[:, 1:] |= closes[:, :-1]
    index = starts.long().cumsum(1) - 1
    # the first patch of each byte's document (indices grow along the row, so a running maximum carries it)
    doc_first = torch.where(doc_start, index, torch.zeros_like(index)).cummax(1).values
    reads = torch.where(closes, index, index - 1)
    reads = torch.where(reads >= doc_first, reads, torch.full_like(reads, -1))
    count = index[:, -1] + 1
    length = int(count.max())
    patch_seg = (seg.max(1, keepdim=True).values + 1).expand(b, length).clone()  # unused patches: a new document
    patch_seg.scatter_(1, index, seg)
    patch_pos = torch.zeros(b, length, dtype=torch.long, device=closes.device)
    patch_pos.scatter_(1, index, index - doc_first)
    return Patches(starts, index, reads, count, patch_seg, patch_pos)


def pool(h: torch.Tensor, patches: Patches) -> torch.Tensor:
    """Byte vectors ``[b, s, d]`` -> each patch's mean ``[b, P, d]`` (unused patches: zeros)."""
    b, s, d = h.shape
    where = patches.index[..., None].expand(b, s, d)
    sums = h.new_zeros(b, patches.length, d).scatter_add(1, where, h)
    counts = h.new_zeros(b, patches.length).scatter_add(1, patches.index, h.new_ones(b, s))
    return sums / counts.clamp(min=1)[..., None]


def read_back(g: torch.Tensor, patches: Patches, none: torch.Tensor) -> torch.Tensor:
    """Patch vectors ``[b, P, D]`` -> for each byte the vector of the patch it reads ``[b, s, D]`` (``none`` where
    it reads none)."""
    b, s = patches.reads.shape
    picked = g.gather(1, patches.reads.clamp(min=0)[..., None].expand(b, s, g.shape[-1]))
    return torch.where((patches.reads >= 0)[..., None], picked, none.to(g.dtype))
