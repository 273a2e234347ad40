"""Document sources: the built-in corpus, WebDataset shards and zarr stores, with random access by id.

A source exposes ``lengths`` (tokens per document), ``groups`` (document ids that live together:
a shard, a store chunk, a block of files; the order shuffles groups, then documents within a
group, so reads stay local) and ``read(doc_id)``. Documents are split into train and validation
by a hash of their id. Bad shards or chunks found when the source opens follow the data policy
(``fail``: one line naming the file; ``skip``: their documents leave the order and are counted);
corruption found while reading always stops the run with one line - never a wrong batch.

WebDataset shards are read whole. A document too long for one shard lies in chunks over consecutive shards;
it is one document (one id, one group: the shard it starts in), read whole from all of them. A token stream
tells its source which shards it will read next
(``prefetch``), and the source loads a few of them ahead on background threads; what is read is
the same either way, only when. Shards behind a command or a network (``pipe:``, http, s3, gs) are
retried with exponential backoff when a read fails or its checksum does not match; a local shard
that fails its checksum is corrupt and stops the run at once. Each source counts what reading cost
(``ReadStats``).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chimera.checksums import sha256_file
from chimera.data.dataset_files import LENGTHS, parse_shard, read_manifest
from chimera.data.readers import BadData
from chimera.errors import UserError


def validation_mask(num_docs: int, fraction: float) -> np.ndarray:
    """Documents whose id hashes under ``fraction`` form the validation split."""
    ids = np.arange(num_docs, dtype=np.uint64)
    h = (ids * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)  # Fibonacci hashing -> 24 bits
    return h.astype(np.float64) / float(1 << 24) < fraction


REMOTE_PREFIXES = ("pipe:", "http:", "https:", "s3:", "gs:")


def is_remote(url: str) -> bool:
    """A shard read through a command or over a network, whose failures may be transient."""
    return url.startswith(REMOTE_PREFIXES)


def pause_before_retry(seconds: float) -> None:
    """The backoff between attempts at a remote shard (a function of its own, so a test can record it)."""
    time.sleep(seconds)


class LRU(OrderedDict):
    """The ``capacity`` most recently used values by key. Room is made before a value is loaded, so it never
    holds more than ``capacity`` values, not even while loading one."""

    def __init__(self, capacity: int):
        super().__init__()
        if capacity < 1:
            raise ValueError(f"an LRU cache needs a capacity of at least 1, got {capacity}")
        self.capacity = capacity

    def get_or(self, key, load):
        if key in self:
            self.move_to_end(key)
            return self[key]
        if len(self) >= self.capacity:
            self.popitem(last=False)
        value = self[key] = load(key)
        return value


@dataclass
class ReadStats:
    """Running totals of a source's shard reads; prefetch threads add to them, so additions take a lock.

    ``bytes`` and ``seconds``: what reading shards (every attempt) moved and took, summed over threads;
    ``retries``: attempts repeated after a failed read; ``wait_seconds``: how long the caller (the step
    loop) waited for shards - the part of reading that prefetch did not hide."""

    bytes: int = 0
    seconds: float = 0.0
    retries: int = 0
    wait_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **amounts: float) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def totals(self) -> dict[str, float]:
        with self._lock:
            return {"bytes": self.bytes, "seconds": self.seconds, "retries": self.retries,
                    "wait_seconds": self.wait_seconds}


class DocumentSource:
    name: str
    eos_id: int
    vocab_size: int
    lengths: np.ndarray
    groups: list[np.ndarray]
    excluded: int = 0  # documents dropped by the skip policy
    prefetch_depth: int = 0  # shards ahead the source wants to hear of (see ``prefetch``); 0: it does not prefetch
    read_stats: ReadStats | None = None  # sources that read shards count the cost here

    def read(self, doc_id: int) -> np.ndarray:
        raise NotImplementedError

    def shards_of(self, doc_ids: np.ndarray) -> np.ndarray:
        """The shard each document lives in; asked only of sources with ``prefetch_depth > 0``."""
        raise NotImplementedError

    def prefetch(self, shards: list[int]) -> None:
        """A hint: the reader will next read ``shards``, in this order, after the one it is in."""

    def split_ids(self, val_fraction: float) -> tuple[list[np.ndarray], np.ndarray]:
        """(train groups, validation ids) after the validation split."""
        val = validation_mask(len(self.lengths), val_fraction)
        train_groups = [g[~val[g]] for g in self.groups]
        in_groups = np.concatenate(self.groups) if self.groups else np.zeros(0, np.int64)
        return [g for g in train_groups if len(g)], np.sort(in_groups[val[in_groups]])


class DocumentWindows(DocumentSource):
    """A source's documents cut into consecutive windows of ``window_tokens`` tokens (the last of a document
    shorter), each window a document of its own: what a source of few long documents (a genome, a chromosome)
    is split into so that the train/validation split has something on both sides. Window ``w`` of the list
    is the ``w``-th window in document order, so the cut is a pure function of (lengths, window_tokens)."""

    def __init__(self, source: DocumentSource, window_tokens: int):
        self.inner, self.window_tokens = source, int(window_tokens)
        self.name, self.eos_id, self.vocab_size = source.name, source.eos_id, source.vocab_size
        self.excluded, self.read_stats = source.excluded, source.read_stats
        counts = -(-source.lengths // self.window_tokens)  # windows per document (ceil)
        self.document = np.repeat(np.arange(len(source.lengths)), counts)  # window -> its document
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.start = (np.arange(len(self.document)) - first[self.document]) * self.window_tokens
        self.lengths = np.minimum(source.lengths[self.document] - self.start, self.window_tokens)
        in_source = np.zeros(len(source.lengths), dtype=bool)
        if source.groups:
            in_source[np.concatenate(source.groups)] = True
        self.groups = [np.array([w]) for w in np.flatnonzero(in_source[self.document])]

    def read(self, doc_id: int) -> np.ndarray:
        lo = int(self.start[doc_id])
        return self.inner.read(int(self.document[doc_id]))[lo : lo + int(self.lengths[doc_id])]

    def describe(self) -> dict:
        return {"window_tokens": self.window_tokens, "windows": len(self.lengths),
                "documents": len(self.inner.lengths)}


def splittable(source: DocumentSource, val_fraction: float, seq_len: int) -> DocumentSource:
    """``source`` itself when its documents fall on both sides of the validation split; else its documents cut
    into windows (``DocumentWindows``) so that about ``4 / val_fraction`` of them share the tokens (the
    validation split then holds about four), none shorter than a sequence (``seq_len + 1`` tokens).
    A source that cannot be split even so is a one-line ``UserError``."""
    train, val = source.split_ids(val_fraction)
    if train and len(val):
        return source
    total = int(source.lengths.sum())
    window = max(seq_len + 1, -(-total // int(np.ceil(4 / val_fraction))))
    windows = DocumentWindows(source, window)
    train, val = windows.split_ids(val_fraction)
    if not train or not len(val):
        raise UserError(f"source {source.name!r}: {len(source.lengths)} document(s) of {total:,} tokens cannot be "
                        f"split into train and validation (data.val_fraction={val_fraction}, windows of "
                        f"{window:,} tokens for data.seq_len={seq_len}); add data, lower data.seq_len or raise "
                        "data.val_fraction")
    return windows


class BuiltinSource(DocumentSource):
    """The interpreter's standard-library sources; split by file path as in ``chimera.data.builtin``."""

    def __init__(self, tokenizer, include_tests: bool = False, name: str = "builtin"):
        from chimera.data.builtin import in_validation, stdlib_files

        self.name, self.eos_id, self.vocab_size = name, tokenizer.eos_id, tokenizer.vocab_size
        files = stdlib_files(include_tests)
        self._docs = [tokenizer.encode(path.read_bytes()) for _, path in files]
        self._paths = [rel for rel, _ in files]
        self._in_validation = in_validation
        self.lengths = np.array([len(d) for d in self._docs], dtype=np.int64)
        self.groups = [np.array([i]) for i in range(len(files))]  # small and in memory: shuffle every document

    def read(self, doc_id: int) -> np.ndarray:
        return self._docs[doc_id]

    def split_ids(self, val_fraction: float):
        val = np.array([self._in_validation(p, val_fraction) for p in self._paths])
        return [g[~val[g]] for g in self.groups if (~val[g]).any()], np.flatnonzero(val)


class PreparedSource(DocumentSource):
    """Common part of WebDataset and zarr sources: the manifest and the document lengths."""

    FORMAT: str  # the manifest's "format" this source reads

    def __init__(self, path: str, name: str, bad: BadData, verify: bool):
        self.root, self.manifest = read_manifest(path)
        found = self.manifest.get("format")
        if found != self.FORMAT:
            raise UserError(f"source {name!r}: {path} holds a {found} dataset, not {self.FORMAT}; set "
                            f"type: {found} for this source")
        self.name, self.bad, self.verify = name, bad, verify
        tok = self.manifest["tokenizer"]
        self.eos_id, self.vocab_size = tok["eos_id"], tok["vocab_size"]
        self.tokenizer_identity = tok
        self.dtype = np.dtype(self.manifest["dtype"])
        lengths_file = self.root / LENGTHS
        if not lengths_file.is_file() or (verify and sha256_file(lengths_file) != self.manifest["lengths"]["sha256"]):
            raise UserError(f"{lengths_file} is missing or does not match the manifest; re-run `chimera data prepare`")
        self.lengths = np.load(lengths_file)


class WebDatasetSource(PreparedSource):
    """Tar shards read whole (local path, or any URL ``webdataset.gopen`` opens, e.g. ``pipe:`` commands).

    ``urls``: a brace pattern naming the shards in manifest order, e.g.
    ``pipe:aws s3 cp s3://bucket/ds/shard-{000000..000041}.tar -``; default: beside the manifest.

    Memory: the ``cache_shards`` most recently read shards, plus at most ``prefetch_shards`` loads started
    ahead (running, or done and not yet read): never more than ``cache_shards + prefetch_shards`` shards.
    ``prefetch_shards=0`` reads each shard when the stream reaches it. A remote shard (``is_remote``) is
    tried ``read_attempts`` times, waiting ``retry_delay`` seconds after the first failure and twice as
    long after each next one; local shards are tried once.

    Threads: the cache and the pending loads belong to the caller's thread; a prefetch thread only runs
    ``_load``, which shares nothing with it but ``read_stats``.
    """

    FORMAT = "webdataset"

    def __init__(self, path: str, name: str, bad: BadData, verify: bool = True, urls: str | None = None,
                 cache_shards: int = 4, prefetch_shards: int = 2, read_attempts: int = 4, retry_delay: float = 0.5):
        # webdataset's readers are imported here, in the caller's thread: a package imported by two threads at
        # once (the step loop and a prefetch thread, at the first shard) can be seen half-initialised by one
        import webdataset.gopen  # noqa: F401
        import webdataset.tariterators  # noqa: F401

        super().__init__(path, name, bad, verify)
        if prefetch_shards < 0 or read_attempts < 1 or retry_delay < 0:
            raise ValueError(f"prefetch_shards={prefetch_shards} (>= 0), read_attempts={read_attempts} (>= 1), "
                             f"retry_delay={retry_delay} (>= 0)")
        shards = self.manifest["shards"]
        if urls:
            import braceexpand

            self.urls = list(braceexpand.braceexpand(urls))
            if len(self.urls) != len(shards):
                raise UserError(f"urls {urls!r} name {len(self.urls)} shards but the manifest lists {len(shards)}")
        else:
            self.urls = [str(self.root / s["path"]) for s in shards]
        # a document lives in shards [start_shard, end_shard): where it starts and those its chunks continue in
        self.start_shard = np.zeros(len(self.lengths), dtype=np.int64)
        self.end_shard = np.zeros(len(self.lengths), dtype=np.int64)
        for i, s in enumerate(shards):
            first, count = s["first_document"], s["documents"]
            begins = first + (1 if s.get("first_chunk", 0) else 0)  # the first documents that start here
            self.start_shard[begins : first + count] = i
            self.end_shard[first : first + count] = i + 1
        ok = np.array([self._shard_ok(i, s) for i, s in enumerate(shards)], dtype=bool)
        bad_before = np.concatenate([[0], np.cumsum(~ok)])
        whole = bad_before[self.end_shard] == bad_before[self.start_shard]  # none of its shards is bad
        self.excluded += int((~whole).sum())
        self.groups = [g for g in np.split(np.flatnonzero(whole), np.flatnonzero(np.diff(
            self.start_shard[whole])) + 1) if len(g)]  # documents grouped by the shard they start in
        self.prefetch_depth, self.read_attempts, self.retry_delay = prefetch_shards, read_attempts, retry_delay
        self.read_stats = ReadStats()
        self._cache = LRU(cache_shards)
        self._pending: dict[int, Future] = {}  # shard -> its load started ahead

    def _shard_ok(self, i: int, shard: dict) -> bool:
        url = self.urls[i]
        if is_remote(url):
            return True  # remote: verified when read
        path = Path(url)
        if not path.is_file():
            self.bad.report("missing shard", url, "shard file is missing")
            return False
        if path.stat().st_size != shard["bytes"]:
            self.bad.report("truncated or corrupt shard", url,
                            f"{path.stat().st_size} bytes but the manifest says {shard['bytes']} (truncated?)")
            return False
        return True

    def _load(self, i: int) -> dict[int, np.ndarray]:
        """Shard ``i`` read, checked and parsed: ``{doc_id: tokens}``. A remote shard whose read fails or does
        not match the manifest is read again after a backoff; the last failure is a one-line ``UserError``."""
        attempts = self.read_attempts if is_remote(self.urls[i]) else 1
        for attempt in range(1, attempts):
            try:
                return self._load_once(i)
            except UserError:
                self.read_stats.add(retries=1)
                pause_before_retry(self.retry_delay * 2 ** (attempt - 1))
        try:
            return self._load_once(i)
        except UserError as e:
            if attempts == 1:
                raise
            raise UserError(f"{e} (gave up after {attempts} attempts)") from None

    def _load_once(self, i: int) -> dict[int, np.ndarray]:
        from webdataset.gopen import gopen

        url, shard = self.urls[i], self.manifest["shards"][i]
        data, started = b"", time.perf_counter()
        try:
            with gopen(url, "rb") as stream:
                data = stream.read()
        except Exception as e:  # gopen raises plain exceptions for failed pipes
            raise UserError(f"shard {url} could not be read ({e})") from None
        finally:
            self.read_stats.add(bytes=len(data), seconds=time.perf_counter() - started)
        if self.verify:
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise UserError(f"shard {url} does not match its manifest checksum ({len(data)} bytes read); "
                                "it is corrupt - re-create or re-download it")
        docs = parse_shard(data, url, self.dtype)
        if len(docs) != shard["documents"]:
            raise UserError(f"shard {url} holds {len(docs)} documents but the manifest says {shard['documents']}")
        return docs

    def read(self, doc_id: int) -> np.ndarray:
        """The document whole: its chunks in the shards it spans, joined (whichever rank's stream asks for it)."""
        parts = [self._cache.get_or(i, self._take)[doc_id]
                 for i in range(int(self.start_shard[doc_id]), int(self.end_shard[doc_id]))]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _take(self, i: int) -> dict[int, np.ndarray]:
        """Shard ``i`` for the cache: its load started ahead if there is one, else read now; the wait is counted."""
        started = time.perf_counter()
        try:
            ahead = self._pending.pop(i, None)
            return ahead.result() if ahead is not None else self._load(i)
        finally:
            self.read_stats.add(wait_seconds=time.perf_counter() - started)

    def shards_of(self, doc_ids: np.ndarray) -> np.ndarray:
        return self.start_shard[doc_ids]

    def prefetch(self, shards: list[int]) -> None:
        """Start loading the first ``prefetch_depth`` of ``shards`` that are neither cached nor already started.

        A started load the reader no longer expects (after a jump, e.g. a resume elsewhere) is dropped once it
        has finished - its error, if it failed, is never raised - and holds its place until then, so the
        bound on memory holds. A failed load that is expected raises when the reader reaches its shard."""
        wanted = shards[: self.prefetch_depth]
        for i, load in list(self._pending.items()):
            if i not in wanted and load.done():
                del self._pending[i]
        for i in wanted:
            if len(self._pending) >= self.prefetch_depth:
                break
            if i not in self._cache and i not in self._pending:
                self._pending[i] = self._load_in_background(i)

    def wait_for_loads_ahead(self) -> None:
        """Block until every load started ahead has finished (its shard stays pending for the reader), e.g.
        before counting what was read."""
        wait(list(self._pending.values()))

    def _load_in_background(self, i: int) -> Future:
        result: Future = Future()

        def run():
            try:
                result.set_result(self._load(i))
            except Exception as e:  # handed to the reader, which raises it when it reaches the shard
                result.set_exception(e)

        # a daemon thread: a hung remote read must not keep a stopping run from exiting
        threading.Thread(target=run, name=f"prefetch {self.name} shard {i}", daemon=True).start()
        return result


class ZarrSource(PreparedSource):
    """A chunked token array with document offsets; reads are served from whole cached chunks."""

    FORMAT = "zarr"

    def __init__(self, path: str, name: str, bad: BadData, verify: bool = True, cache_chunks: int = 16):
        import zarr

        super().__init__(path, name, bad, verify)
        store = self.manifest["store"]
        self.store_path = self.root / store["path"]
        self.chunk = store["chunk_tokens"]
        bad_ranges = self._check_files(store["files"])
        try:
            group = zarr.open_group(str(self.store_path), mode="r")
            self.tokens = group["tokens"]
            self.offsets = group["offsets"][:]
        except Exception as e:  # zarr raises various errors on damaged metadata
            raise UserError(f"zarr store {self.store_path} cannot be opened ({e.__class__.__name__}); re-prepare it") \
                from None
        if len(self.offsets) != len(self.lengths) + 1 or not np.array_equal(np.diff(self.offsets), self.lengths):
            raise UserError(f"zarr store {self.store_path}: document offsets disagree with {LENGTHS}; re-prepare it")
        starts, ends = self.offsets[:-1], self.offsets[1:]
        good = np.ones(len(self.lengths), dtype=bool)
        for lo, hi in bad_ranges:
            good &= ~((starts < hi) & (ends > lo))
        self.excluded = int((~good).sum())
        ids = np.flatnonzero(good)
        block = starts[ids] // self.chunk  # group documents by the chunk they start in
        cuts = np.flatnonzero(np.diff(block)) + 1
        self.groups = [g for g in np.split(ids, cuts) if len(g)]
        self._cache = LRU(cache_chunks)

    def _check_files(self, files: dict) -> list[tuple[int, int]]:
        """Token ranges of chunk files that are missing or corrupt (metadata damage always fails)."""
        bad = []
        for rel, meta in files.items():
            f = self.store_path / rel
            broken = not f.is_file() or f.stat().st_size != meta["bytes"] or (
                self.verify and sha256_file(f) != meta["sha256"])
            if not broken:
                continue
            parts = Path(rel).parts
            if parts[0] != "tokens" or parts[-1] == "zarr.json":
                raise UserError(f"zarr store file {f} is missing or corrupt; re-prepare the dataset")
            self.bad.report("corrupt store chunk", str(f), "chunk file is missing or fails its checksum")
            index = int(parts[-1])
            bad.append((index * self.chunk, (index + 1) * self.chunk))
        return bad

    def _block(self, b: int) -> np.ndarray:
        try:
            return self.tokens[b * self.chunk : (b + 1) * self.chunk]
        except Exception as e:
            raise UserError(f"zarr store {self.store_path}: chunk {b} cannot be decoded ({e}); re-prepare it") from None

    def read(self, doc_id: int) -> np.ndarray:
        lo, hi = int(self.offsets[doc_id]), int(self.offsets[doc_id + 1])
        blocks = [self._cache.get_or(b, self._block) for b in range(lo // self.chunk, (hi - 1) // self.chunk + 1)]
        joined = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
        base = (lo // self.chunk) * self.chunk
        return joined[lo - base : hi - base]
