"""Dynamic token merging between global blocks: a ToMe-style bipartite merge restricted to neighbours.

ToMe (Bolya et al., arXiv 2210.09461) splits tokens into two alternating sets A and B and merges each A token into
its most similar B token. Restricted to neighbours, the alternation is by position within a document: the tokens
at even in-document positions are A, those at odd positions are B, and the only candidate pairs are

    P_k = (a_k, b_k) = (2k, 2k + 1)   (in-document positions)

Pairs are disjoint, so every merge is well-defined and there are no chains within one call; a merged token can be
merged again by the next call (hierarchical merging), which is why every token carries a size ``s`` (how many
input tokens it stands for) and merged vectors are size-weighted means. For a sequence ``x [n, d]``:

    c_t     = cos(x_{t-1}, x_t)                                   # similarity of t with its left neighbour
    want_t  = [t is a B token] and [t-1 is in t's document] and [c_t > tau]
    cap_t   = floor(rho * N_t),  N_t = number of (non-padding) tokens of t's document at positions <= t
    M_t     = min(cap_t, M_{t-1} + want_t),  M = 0 before a document  # merges accepted so far in t's document
            = W_t + min(0, min_{j <= t} (cap_j - W_j)),  W_t = sum_{j <= t} want_j   (j in t's document; one cummin)
    merge_t = M_t - M_{t-1}                                       # B token t joins its A partner t - 1
    group g = a maximal run {t-1, t} with merge_t, or a single token
    z_g     = sum_{t in g} s_t x_t / S_g,  S_g = sum_{t in g} s_t   # size-weighted mean; S_g is z_g's size

``rho`` (``max_ratio``, at most 1/2: pairs can remove at most every second token) bounds the fraction of tokens a
call removes, at every prefix of every document: after any position t at most ``floor(rho N_t)`` merges have
happened in its document (so one document's merges never change another's). The cap is
applied greedily from the left and not as ToMe's global top-r, because a global top-r would let a later pair's
similarity decide whether an earlier pair merges, which breaks causality.

Output: merged tokens ``[b, m, d]`` with ``m`` the longest merged sequence of the batch; each sequence's merged
tokens are left-aligned and followed by padding (zero vectors, segment id -1, size 0). Right padding is what
lets a causal mixer ignore it without a mask: no valid merged token is at a later position than a padding slot.
A document-aware mixer (``PackedDocuments``) sees padding as one more document (-1). Input tokens with segment id
< 0 are padding too: they are dropped (never merged, their un-merged output is zero).

Causality. The merged token z_g sits at the position of its last member e_g; z_g and whether g exists depend only
on inputs at positions <= e_g (merge_t uses x_{t-1}, x_t and earlier decisions). After any causal model over the
merged tokens, its output y_g depends on z_1..z_g, i.e. on inputs at positions <= e_g. Un-merging gives position
t the output of the *last group known by time t to be complete*:

    B token t:                      read y_{g(t)}           # its group {t-1, t} or {t} ends at t
    A token t that could not merge: read y_{g(t)}           # it is a group of one, known at t
    A token t that could merge:     read y_{g(t) - 1}       # its group may still grow to t + 1: read the group
                                                            # before it (ends at t - 1), zero at a document start

"Could merge" is decided from what is known at t, not from x_{t+1}: ``tau < 1`` (a cosine can exceed it) and the
cap leaves room for one more merge (``M_t < floor(rho (N_t + 1))``). An A token's output therefore never reveals
whether x_{t+1} is similar to x_t -- reading its own group when it happened not to merge would leak exactly that
bit, one step ahead, to the LM objective. The price: an A token that could have merged sees the global model one
group late (the full-resolution residual stream carries its own information). Hence ``unmerge(merge(x)) = x``
wherever no merge was possible (``tau >= 1`` or ``rho = 0``), and, with ``causal=False`` (bidirectional use, e.g.
sequence classification), every position reads its own group, so it holds wherever a token was not merged.
The same argument gives prefix consistency (decoding): the merges, groups and reads of a prefix are those of the
whole sequence restricted to it. The pairing never looks at the next token's document either, for the same reason.

What is differentiable. Merged vectors are means, so gradients reach every member of a group; un-merging is a
gather. The merge decision ``c_t > tau`` is discrete. With a learned threshold (``tau`` requires grad) a soft
gate ``p_t = sigmoid((c_t - tau) / T)`` gives ``tau`` (and ``x`` through ``c_t``) a straight-through gradient:
a merged token's value is exactly z_g, and its gradient is that of ``p_t z_g + (1 - p_t) x_t`` at ``p_t = 1``,
i.e. "would the loss rather have this merged token closer to the mean (merge more: lower tau) or closer to its
last member (merge less: raise tau)". Pairs that did not merge give ``tau`` no gradient. With a configured float
threshold nothing is learned and no gate is computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chimera.models.documents import in_document_positions


@dataclass(frozen=True)
class Merges:
    """How one ``merge`` call grouped a batch; un-merges outputs back to one vector per input position."""

    group_index: torch.Tensor  # [b, n] merged slot holding input position t; -1 for input padding
    read_index: torch.Tensor  # [b, n] merged slot whose output position t gets; -1: zero (document start, padding)
    sizes: torch.Tensor  # [b, m] input tokens (counting earlier merges) each merged token stands for; 0 at padding
    segment_ids: torch.Tensor  # [b, m] document of each merged token; -1 at padding
    merged_length: torch.Tensor  # [b] valid merged tokens per sequence
    input_length: torch.Tensor  # [b] valid input tokens per sequence

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """``[b, m, d] -> [b, n, d]``: position t gets the output of merged slot ``read_index[t]`` (zero where -1)."""
        index = self.read_index.clamp(min=0)
        out = torch.gather(y, 1, index[..., None].expand(-1, -1, y.shape[-1]))
        return out * (self.read_index >= 0)[..., None].to(y.dtype)

    def then(self, later: Merges) -> Merges:
        """This merge followed by ``later`` (a merge of this one's merged tokens) as one ``Merges`` from the input
        positions to ``later``'s merged tokens: ``later.unmerge`` then ``self.unmerge``, in one gather. Each of the
        two reads is causal (module docstring), so their composition is."""

        def through(index: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
            return torch.where(index >= 0, torch.gather(outer, 1, index.clamp(min=0)), -1)

        return Merges(through(self.group_index, later.group_index), through(self.read_index, later.read_index),
                      later.sizes, later.segment_ids, later.merged_length, self.input_length)

    @property
    def ratio(self) -> float:
        """Merged tokens over input tokens in the batch (1.0: nothing merged; 0.5: every pair merged)."""
        return float(self.merged_length.sum()) / max(float(self.input_length.sum()), 1.0)

    @property
    def position_ids(self) -> torch.Tensor:
        """``[b, m]`` position of each merged token within its document (for RoPE); 0 at padding."""
        return in_document_positions(self.segment_ids.t()).t() * (self.segment_ids >= 0)


def _check(max_ratio: float, temperature: float) -> None:
    if not 0.0 <= max_ratio <= 0.5:
        raise ValueError(f"token merging: max_ratio={max_ratio} is outside [0, 0.5] (neighbour pairs can remove "
                         "at most every second token per call); use a value in that range")
    if not temperature > 0:
        raise ValueError(f"token merging: temperature={temperature} must be > 0")


def merge(x: torch.Tensor, segment_ids: torch.Tensor | None, threshold: float | torch.Tensor, *,
          sizes: torch.Tensor | None = None, max_ratio: float = 0.5, causal: bool = True,
          temperature: float = 0.05) -> tuple[torch.Tensor, torch.Tensor, Merges]:
    """Merge neighbour pairs of ``x [b, n, d]`` whose cosine similarity exceeds ``threshold`` (see the module).

    ``segment_ids [b, n]``: document of each token (None: one document; < 0: padding). ``sizes [b, n]``: tokens
    each input stands for (None: 1; pass ``Merges.sizes`` when merging merged tokens again). ``threshold``: a
    float, or a one-element tensor that requires grad (learned; straight-through gate of temperature ``temperature``).
    Returns ``(merged [b, m, d], merged_segment_ids [b, m], Merges)``.
    """
    _check(max_ratio, temperature)
    b, n, d = x.shape
    device = x.device
    seg = torch.zeros(b, n, dtype=torch.long, device=device) if segment_ids is None else segment_ids.long()
    valid = seg >= 0
    weight = valid.to(x.dtype) if sizes is None else sizes.to(x.dtype) * valid
    tau = torch.as_tensor(threshold, dtype=x.dtype, device=device)

    # pairs: B tokens (odd in-document position) with their left neighbour in the same document
    same_doc_as_prev = torch.zeros_like(valid)
    same_doc_as_prev[:, 1:] = valid[:, 1:] & valid[:, :-1] & (seg[:, 1:] == seg[:, :-1])
    odd = in_document_positions(torch.where(valid, seg, -1).t()).t() % 2 == 1
    second = same_doc_as_prev & odd
    first = valid & ~second
    cos = torch.zeros(b, n, dtype=x.dtype, device=device)
    cos[:, 1:] = F.cosine_similarity(x[:, 1:], x[:, :-1], dim=-1)
    want = second & (cos > tau.detach())

    # the cap, per document, greedily from the left: M_t = W_t + min(0, cummin_j (cap_j - W_j)), j in t's document
    starts = valid & ~same_doc_as_prev
    seen_row, wanted_row = torch.cumsum(valid.long(), dim=1), torch.cumsum(want.long(), dim=1)
    seen = seen_row - torch.cummax(torch.where(starts, seen_row - 1, 0), dim=1).values  # N_t
    wanted = wanted_row - torch.cummax(torch.where(starts, wanted_row, 0), dim=1).values  # W_t
    cap = torch.floor(max_ratio * seen.to(torch.float64)).long()
    # a running minimum that restarts at each document: every later document's values are shifted below all
    # earlier ones (|cap - W| <= n), so the minimum up to t is taken over t's document only
    shift = torch.cumsum(starts.long(), dim=1) * (2 * n + 1)
    accepted = wanted + (torch.cummin(cap - wanted - shift, dim=1).values + shift).clamp(max=0)  # M_t
    accepted_before = F.pad(accepted, (1, 0))[:, :-1]  # M_{t-1}
    merged_into_prev = (accepted - accepted_before) > 0

    # groups: a new merged slot at every valid token that did not join its left neighbour
    opens = valid & ~merged_into_prev
    group = torch.where(valid, torch.cumsum(opens.long(), dim=1) - 1, -1)
    merged_length = opens.sum(dim=1)
    m = max(int(merged_length.max()) if b else 0, 1)
    slot = torch.where(valid, group, m)  # input padding goes to a scratch slot m, dropped below

    xw = torch.where(valid[..., None], x, torch.zeros((), dtype=x.dtype, device=device)) * weight[..., None]
    sums = x.new_zeros(b, m + 1, d).scatter_add(1, slot[..., None].expand(-1, -1, d), xw)[:, :m]
    size = weight.new_zeros(b, m + 1).scatter_add(1, slot, weight)[:, :m]
    merged = sums / size.clamp(min=torch.finfo(x.dtype).tiny)[..., None]
    if tau.requires_grad:  # straight-through gate: value z_g, gradient of p z_g + (1 - p) x_t at p = 1
        gate = torch.sigmoid((cos - tau) / temperature)
        mean_at_t = torch.gather(merged, 1, group.clamp(min=0)[..., None].expand(-1, -1, d))
        delta = (gate - gate.detach())[..., None] * (mean_at_t - x)
        delta = torch.where(merged_into_prev[..., None], delta, torch.zeros((), dtype=x.dtype, device=device))
        merged = merged + x.new_zeros(b, m + 1, d).scatter_add(1, slot[..., None].expand(-1, -1, d), delta)[:, :m]
    merged_seg = seg.new_full((b, m + 1), -1).scatter(1, slot, torch.where(valid, seg, -1))[:, :m]

    # un-merge reads (module docstring): an A token that could still merge reads the group before its own
    could_merge = first & (tau.detach() < 1) & (accepted < torch.floor(max_ratio * (seen + 1).double()).long())
    read = group
    if causal:
        read = torch.where(could_merge, torch.where(same_doc_as_prev, group - 1, -1), group)
    merges = Merges(group, read, size, merged_seg, merged_length, valid.sum(dim=1))
    return merged, merged_seg, merges


def merge_reference(x: torch.Tensor, segment_ids: torch.Tensor | None, threshold: float, *,
                    sizes: torch.Tensor | None = None, max_ratio: float = 0.5,
                    causal: bool = True) -> tuple[list[torch.Tensor], list[list[int]], list[list[int]]]:
    """The same merge, one sequence and one position at a time (for tests): per sequence, the merged vectors
    ``[m_i, d]``, their segment ids, and each input position's read slot (-1: zero)."""
    b, n, _ = x.shape
    out_vectors, out_segments, out_reads = [], [], []
    for i in range(b):
        seg = [0] * n if segment_ids is None else [int(s) for s in segment_ids[i]]
        size = [1.0] * n if sizes is None else [float(s) for s in sizes[i]]
        groups: list[list[int]] = []
        reads: list[int] = []
        merges_so_far, seen, pos = 0, 0, 0
        for t in range(n):
            if seg[t] < 0:
                reads.append(-1)
                continue
            in_doc = t > 0 and seg[t - 1] == seg[t]
            pos = pos + 1 if in_doc else 0
            if not in_doc:  # the cap counts within a document
                merges_so_far, seen = 0, 0
            seen += 1
            if pos % 2 == 1:  # B token: may join its A partner t - 1
                similar = F.cosine_similarity(x[i, t], x[i, t - 1], dim=0) > threshold
                if similar and merges_so_far + 1 <= math.floor(max_ratio * seen):
                    merges_so_far += 1
                    groups[-1].append(t)
                else:
                    groups.append([t])
                reads.append(len(groups) - 1)
            else:  # A token: opens a group
                groups.append([t])
                could_merge = threshold < 1 and merges_so_far + 1 <= math.floor(max_ratio * (seen + 1))
                if causal and could_merge:
                    reads.append(len(groups) - 2 if in_doc else -1)
                else:
                    reads.append(len(groups) - 1)
        out_vectors.append(torch.stack([sum(size[t] * x[i, t] for t in g) / sum(size[t] for t in g)
                                        for g in groups]) if groups else x.new_zeros(0, x.shape[-1]))
        out_segments.append([seg[g[0]] for g in groups])
        out_reads.append(reads)
    return out_vectors, out_segments, out_reads


class NeighbourMerge(nn.Module):
    """``merge`` with its configuration and (optionally learned) threshold; ``metrics()`` reports the last call."""

    def __init__(self, threshold: float = 0.9, *, max_ratio: float = 0.5, learned: bool = False,
                 temperature: float = 0.05, causal: bool = True):
        super().__init__()
        _check(max_ratio, temperature)
        self.max_ratio, self.temperature, self.causal = max_ratio, temperature, causal
        # one element, not 0-d: DeepSpeed's broadcast of the weights cannot view a 0-d tensor
        if learned:
            self.threshold = nn.Parameter(torch.full((1,), float(threshold)))
        else:
            self.register_buffer("threshold", torch.full((1,), float(threshold)), persistent=False)
        self._last: dict[str, float] = {}

    def forward(self, x: torch.Tensor, segment_ids: torch.Tensor | None = None,
                sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, Merges]:
        threshold = self.threshold if self.threshold.requires_grad else float(self.threshold)
        merged, merged_seg, merges = merge(x, segment_ids, threshold, sizes=sizes, max_ratio=self.max_ratio,
                                           causal=self.causal, temperature=self.temperature)
        self._last = {"merged_length": float(merges.merged_length.float().mean()), "merge_ratio": merges.ratio}
        return merged, merged_seg, merges

    def metrics(self) -> dict[str, float]:
        """The last call's mean merged length and merged/input ratio, and the threshold."""
        return {**self._last, "merge_threshold": float(self.threshold)}

    def extra_repr(self) -> str:
        return (f"threshold={float(self.threshold):.3g}, learned={self.threshold.requires_grad}, "
                f"max_ratio={self.max_ratio}, causal={self.causal}")
