"""Document sources: the built-in corpus, WebDataset shards and zarr stores, with random access by id.

A source exposes ``lengths`` (tokens per document), ``groups`` (document ids that live together:
a shard, a store chunk, a block of files; the order shuffles groups, then documents within a
group, so reads stay local) and ``read(doc_id)``. Documents are split into train and validation
by a hash of their id. Bad shards or chunks found when the source opens follow the data policy
(``fail``: one line naming the file; ``skip``: their documents leave the order and are counted);
corruption found while reading always stops the run with one line - never a wrong batch.
"""

from __future__ import annotations

from collections import OrderedDict
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


class LRU(OrderedDict):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def get_or(self, key, load):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = load(key)
        if len(self) > self.capacity:
            self.popitem(last=False)
        return value


class DocumentSource:
    name: str
    eos_id: int
    vocab_size: int
    lengths: np.ndarray
    groups: list[np.ndarray]
    excluded: int = 0  # documents dropped by the skip policy

    def read(self, doc_id: int) -> np.ndarray:
        raise NotImplementedError

    def split_ids(self, val_fraction: float) -> tuple[list[np.ndarray], np.ndarray]:
        """(train groups, validation ids) after the validation split."""
        val = validation_mask(len(self.lengths), val_fraction)
        train_groups = [g[~val[g]] for g in self.groups]
        in_groups = np.concatenate(self.groups) if self.groups else np.zeros(0, np.int64)
        return [g for g in train_groups if len(g)], np.sort(in_groups[val[in_groups]])


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

    def __init__(self, path: str, name: str, bad: BadData, verify: bool):
        self.root, self.manifest = read_manifest(path)
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
    """

    def __init__(self, path: str, name: str, bad: BadData, verify: bool = True, urls: str | None = None,
                 cache_shards: int = 4):
        super().__init__(path, name, bad, verify)
        shards = self.manifest["shards"]
        if urls:
            import braceexpand

            self.urls = list(braceexpand.braceexpand(urls))
            if len(self.urls) != len(shards):
                raise UserError(f"urls {urls!r} name {len(self.urls)} shards but the manifest lists {len(shards)}")
        else:
            self.urls = [str(self.root / s["path"]) for s in shards]
        self.first = np.array([s["first_document"] for s in shards] + [len(self.lengths)], dtype=np.int64)
        self.groups = []
        for i, shard in enumerate(shards):
            if self._shard_ok(i, shard):
                self.groups.append(np.arange(self.first[i], self.first[i + 1]))
            else:
                self.excluded += shard["documents"]
        self._cache = LRU(cache_shards)

    def _shard_ok(self, i: int, shard: dict) -> bool:
        url = self.urls[i]
        if url.startswith(("pipe:", "http:", "https:", "s3:", "gs:")):
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
        from webdataset.gopen import gopen

        url, shard = self.urls[i], self.manifest["shards"][i]
        try:
            with gopen(url, "rb") as stream:
                data = stream.read()
        except Exception as e:  # gopen raises plain exceptions for failed pipes
            raise UserError(f"shard {url} could not be read ({e})") from None
        if self.verify:
            import hashlib

            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise UserError(f"shard {url} does not match its manifest checksum ({len(data)} bytes read); "
                                "it is corrupt - re-create or re-download it")
        docs = parse_shard(data, url, self.dtype)
        if len(docs) != shard["documents"]:
            raise UserError(f"shard {url} holds {len(docs)} documents but the manifest says {shard['documents']}")
        return docs

    def read(self, doc_id: int) -> np.ndarray:
        i = int(np.searchsorted(self.first, doc_id, side="right") - 1)
        return self._cache.get_or(i, self._load)[doc_id]


class ZarrSource(PreparedSource):
    """A chunked token array with document offsets; reads are served from whole cached chunks."""

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
