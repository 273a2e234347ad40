"""A source's documents as one endless token stream, in a global order fixed by (seed, epoch, manifest).

Epoch ``e`` lists the training documents group by group - groups in a permutation drawn from
``(seed, e)``, documents within each group in a permutation drawn from ``(seed, e, group)`` -
each document followed by the separator. Epochs follow one another. A training sequence of length
``L`` is the window ``[c, c + L + 1)`` of this stream (inputs and shifted labels) and advances the
cursor ``c`` by ``L``: the loader's whole state is that cursor, so resuming, or changing the number
of ranks, continues with the very next token.

Each window also says, per token, which document it belongs to (its global sample id
``epoch * num_documents + doc_id``) and its offset in that document, so packing can keep document
boundaries (attention and recurrences restart there).

Because the order is known in advance, a stream that reads shards tells its source, at each window,
which shards come after the one the window starts in (``upcoming_shards``), so the source can load
them ahead. That hint changes when shards are read, never what a window holds, and it needs no state
of its own: after a resume the first window gives it again from the cursor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chimera.data.sources import DocumentSource
from chimera.errors import UserError


@dataclass
class Window:
    tokens: np.ndarray  # [n]
    sample_ids: np.ndarray  # [n] global sample id of each token's document
    offsets: np.ndarray  # [n] position of each token within its document

    def segments(self) -> np.ndarray:
        """Segment ids ``0, 0, 1, 1, 1, 2...``: a new segment wherever the document changes."""
        change = np.concatenate([[0], (np.diff(self.sample_ids) != 0).astype(np.int64)])
        return np.cumsum(change)


class TokenStream:
    """The training (or validation) documents of a source in their global order, read as token windows.

    ``prefetch``: tell the source the shards ahead (training reads move forward; validation reads are
    spread thinly over their stream, so shards loaded ahead of them would mostly be wasted)."""

    def __init__(self, source: DocumentSource, groups: list[np.ndarray], seed: int, shuffle: bool = True,
                 prefetch: bool = True):
        self.source, self.groups, self.seed, self.shuffle, self.prefetch = source, groups, seed, shuffle, prefetch
        self.num_docs = len(source.lengths)
        ids = np.concatenate(groups) if groups else np.zeros(0, np.int64)
        if len(ids) == 0:
            raise UserError(f"source {source.name!r} has no documents in this split; add documents or change "
                            "data.val_fraction")
        self.epoch_tokens = int((source.lengths[ids] + 1).sum())
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._runs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document ids in stream order, end offset of each document within the epoch)."""
        if epoch not in self._epochs:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                groups = [self.groups[g] for g in rng.permutation(len(self.groups))]
                docs = np.concatenate([np.random.default_rng([self.seed, epoch, int(g[0])]).permutation(g)
                                       for g in groups])
            else:
                docs = np.concatenate(self.groups)
            ends = np.cumsum(self.source.lengths[docs] + 1)
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (docs, ends)
        return self._epochs[epoch]

    def shard_runs(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Where the epoch's order enters another shard: (index in the order, shard) of each run of documents."""
        if epoch not in self._runs:
            shards = self.source.shards_of(self.order(epoch)[0])
            starts = np.flatnonzero(np.diff(shards, prepend=-1))
            if len(self._runs) >= 2:
                self._runs.pop(min(self._runs))
            self._runs[epoch] = (starts, shards[starts])
        return self._runs[epoch]

    def upcoming_shards(self, pos: int, count: int) -> list[int]:
        """The next ``count`` distinct shards read after the one holding token ``pos``, in reading order.

        They are looked for in the rest of ``pos``'s epoch, then in the next epoch (fewer when the two hold
        fewer shards); the shard holding ``pos`` is not among them."""
        if count < 1:
            return []
        epoch, q = divmod(pos, self.epoch_tokens)
        k = int(np.searchsorted(self.order(epoch)[1], q, side="right"))  # index of pos's document in the order
        starts, shards = self.shard_runs(epoch)
        run = int(np.searchsorted(starts, k, side="right"))  # runs after the current one begin here
        current = int(shards[run - 1])

        def candidates():
            yield from shards[run:]
            yield from self.shard_runs(epoch + 1)[1]  # only computed when this epoch's rest is too short

        out: list[int] = []
        for shard in candidates():
            if shard != current and shard not in out:
                out.append(int(shard))
                if len(out) == count:  # stop before asking for more, which may compute the next epoch
                    break
        return out

    def window(self, start: int, length: int) -> Window:
        if self.prefetch and self.source.prefetch_depth:
            self.source.prefetch(self.upcoming_shards(start, self.source.prefetch_depth))
        tokens = np.empty(length, dtype=np.int64)
        sample_ids = np.empty(length, dtype=np.int64)
        offsets = np.empty(length, dtype=np.int64)
        filled, pos = 0, start
        while filled < length:
            epoch, q = divmod(pos, self.epoch_tokens)
            docs, ends = self.order(epoch)
            k = int(np.searchsorted(ends, q, side="right"))
            doc = int(docs[k])
            doc_len = int(self.source.lengths[doc])
            offset = q - (int(ends[k]) - doc_len - 1)
            body = self.source.read(doc)
            take = min(length - filled, doc_len + 1 - offset)  # the document's rest, its separator included
            piece = body[offset : min(offset + take, doc_len)]
            tokens[filled : filled + len(piece)] = piece
            if offset + take > doc_len:
                tokens[filled + take - 1] = self.source.eos_id
            sample_ids[filled : filled + take] = epoch * self.num_docs + doc
            offsets[filled : filled + take] = np.arange(offset, offset + take)
            filled += take
            pos += take
        return Window(tokens, sample_ids, offsets)

    def started_samples(self, start: int, end: int) -> list[int]:
        """Global sample ids of the documents whose first token lies in ``[start, end)``, in order."""
        out = []
        pos = start
        while pos < end:
            epoch, q = divmod(pos, self.epoch_tokens)
            docs, ends = self.order(epoch)
            begins = ends - self.source.lengths[docs] - 1
            stop = min(self.epoch_tokens, q + (end - pos))
            lo, hi = np.searchsorted(begins, q, side="left"), np.searchsorted(begins, stop, side="left")
            out += (epoch * self.num_docs + docs[lo:hi]).tolist()
            pos += stop - q
        return out
