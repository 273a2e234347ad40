"""Prepared datasets on disk: WebDataset tar shards or a zarr token store, each with a manifest.

Files of a prepared dataset directory::

    manifest.json      format, tokenizer identity, counts, shards or store, checksums
    lengths.npy        tokens per document (int64), in document-id order
    shard-000000.tar   (webdataset) one member per document: ``{doc_id:012d}.tokens``, raw tokens; a document
                       too long for one shard is cut into chunks ``{doc_id:012d}.c{k:06d}.tokens`` that fill
                       consecutive shards (a shard's ``first_chunk`` > 0: it opens with a continued document)
    tokens.zarr/       (zarr) ``tokens`` (1-D, chunked, zstd) and ``offsets`` (documents' starts, N + 1)

Documents carry no separator on disk; readers append the tokenizer's ``eos_id``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np

from chimera.checksums import sha256_file
from chimera.errors import UserError

MANIFEST = "manifest.json"
LENGTHS = "lengths.npy"
STORE = "tokens.zarr"
VERSION = 1


def doc_key(doc_id: int) -> str:
    return f"{doc_id:012d}"


class ShardWriter:
    """WebDataset shards of at most ``max(shard_bytes, TAR_RECORD)`` bytes (tar pads to whole records).

    A document that does not fit in the current shard starts the next one; one longer than a whole shard is cut
    into chunks: the first fills the current shard, the next ones fill consecutive shards."""

    MEMBER = 2048  # bytes a member may add beyond its data (pax and tar headers, padding); the end-of-archive blocks

    def __init__(self, out: Path, dtype, shard_bytes: int):
        self.out, self.dtype, self.shard_bytes = out, np.dtype(dtype), shard_bytes
        if shard_bytes < min_shard_bytes(self.dtype):
            raise UserError(f"--shard-mb {shard_bytes / (1 << 20):g} is too small: a shard needs at least "
                            f"{min_shard_bytes(self.dtype)} bytes (tar headers and one token); raise --shard-mb")
        if shard_bytes >= TAR_RECORD:  # tar pads the archive to whole records: fill whole records only
            self.shard_bytes = shard_bytes // TAR_RECORD * TAR_RECORD
        self.shards: list[dict] = []
        self._writer = None
        self._bytes = 0

    def _open(self, first_doc: int, first_chunk: int = 0) -> None:
        import webdataset as wds

        path = self.out / f"shard-{len(self.shards):06d}.tar"
        self._writer = wds.TarWriter(str(path), encoder=False)
        self.shards.append({"path": path.name, "first_document": first_doc, "first_chunk": first_chunk,
                            "documents": 0, "tokens": 0})
        self._bytes = self.MEMBER  # the end-of-archive blocks

    def _room(self) -> int:
        """Tokens a member written now may hold without passing ``shard_bytes``."""
        return max(0, (self.shard_bytes - self._bytes - self.MEMBER) // self.dtype.itemsize)

    def add(self, doc_id: int, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype)
        if self._writer is None or (self._room() < len(tokens) and self._fits_fresh(len(tokens))):
            self._next_shard(doc_id)
        if self._room() >= len(tokens):
            self._member(doc_id, "tokens", tokens)
            return
        k, start = 0, 0
        while start < len(tokens):
            if self._room() == 0:
                self._next_shard(doc_id, k)
            take = min(self._room(), len(tokens) - start)
            self._member(doc_id, f"c{k:06d}.tokens", tokens[start : start + take])
            k, start = k + 1, start + take

    def _fits_fresh(self, n: int) -> bool:
        return (self.shard_bytes - 2 * self.MEMBER) // self.dtype.itemsize >= n

    def _next_shard(self, doc_id: int, chunk: int = 0) -> None:
        self.close_shard()
        self._open(doc_id, chunk)

    def _member(self, doc_id: int, field: str, tokens: np.ndarray) -> None:
        data = tokens.tobytes()
        self._writer.write({"__key__": doc_key(doc_id), field: data})
        self._bytes += len(data) + self.MEMBER
        shard = self.shards[-1]
        shard["documents"] += 1
        shard["tokens"] += len(tokens)

    def close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            shard = self.shards[-1]
            path = self.out / shard["path"]
            shard["bytes"], shard["sha256"] = path.stat().st_size, sha256_file(path)

    def finish(self) -> dict:
        self.close_shard()
        return {"shards": self.shards}


TAR_RECORD = 10240  # tarfile pads an archive to a whole record when it closes


def min_shard_bytes(dtype) -> int:
    """The smallest ``shard_bytes`` a ``ShardWriter`` accepts: the end-of-archive blocks and one 1-token member."""
    return 2 * ShardWriter.MEMBER + np.dtype(dtype).itemsize


class ZarrWriter:
    """Tokens appended to one chunked, compressed 1-D array; document offsets beside it."""

    def __init__(self, out: Path, dtype, chunk_tokens: int):
        import zarr

        self.root = out / STORE
        self.group = zarr.open_group(str(self.root), mode="w")
        codec = zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
        self.tokens = self.group.create_array("tokens", shape=(0,), chunks=(chunk_tokens,), dtype=dtype,
                                              compressors=codec)
        self.chunk_tokens = chunk_tokens
        self.offsets = [0]
        self._buffer: list[np.ndarray] = []
        self._buffered = 0

    def add(self, doc_id: int, tokens: np.ndarray) -> None:
        self._buffer.append(tokens.astype(self.tokens.dtype))
        self._buffered += len(tokens)
        self.offsets.append(self.offsets[-1] + len(tokens))
        if self._buffered >= 16 * self.chunk_tokens:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self.tokens.append(np.concatenate(self._buffer))
            self._buffer, self._buffered = [], 0

    def finish(self) -> dict:
        self._flush()
        offsets = np.asarray(self.offsets, dtype=np.int64)
        arr = self.group.create_array("offsets", shape=offsets.shape, chunks=(max(1, min(len(offsets), 1 << 20)),),
                                      dtype="int64")
        arr[:] = offsets
        files = sorted(p for p in self.root.rglob("*") if p.is_file())
        checksums = {str(p.relative_to(self.root)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                     for p in files}
        return {"store": {"path": STORE, "chunk_tokens": self.chunk_tokens, "files": checksums}}


def write_dataset(documents, tokenizer, fmt: str, out: Path, *, shard_bytes: int = 256 << 20,
                  chunk_tokens: int = 1 << 20, on_document=None) -> dict:
    """Tokenize ``documents`` (an iterator of token arrays) into ``out`` atomically; return the manifest.

    The dataset is built in ``out.tmp`` and renamed when complete, so a failure leaves nothing behind.
    """
    from chimera.data.tokenizers import token_dtype

    out = Path(out)
    if out.exists():
        raise UserError(f"--out {str(out)!r} already exists; choose a new directory or remove it")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        dtype = token_dtype(tokenizer.vocab_size)
        writer = ShardWriter(tmp, dtype, shard_bytes) if fmt == "webdataset" else ZarrWriter(tmp, dtype, chunk_tokens)
        lengths = []
        for tokens in documents:
            writer.add(len(lengths), tokens)
            lengths.append(len(tokens))
            if on_document:
                on_document(len(tokens))
        if not lengths:
            raise UserError("the inputs hold no documents; nothing to prepare")
        written = writer.finish()
        np.save(tmp / LENGTHS, np.asarray(lengths, dtype=np.int64))
        manifest = {
            "chimera_dataset": VERSION,
            "format": fmt,
            "tokenizer": tokenizer.identity(),
            "dtype": np.dtype(dtype).name,
            "documents": len(lengths),
            "tokens": int(sum(lengths)),
            "lengths": {"path": LENGTHS, "sha256": sha256_file(tmp / LENGTHS)},
            **written,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(path: str | Path) -> tuple[Path, dict]:
    """A dataset directory or its manifest.json -> (directory, manifest)."""
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{str(path)!r} is not a prepared dataset (no {MANIFEST}); run `chimera data prepare` first")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if manifest.get("chimera_dataset") != VERSION:
        raise UserError(f"{file} is not a Chimera dataset manifest (version {manifest.get('chimera_dataset')!r})")
    return file.parent, manifest


def parse_shard(data: bytes, where: str, dtype) -> dict[int, np.ndarray]:
    """A shard's bytes -> {doc_id: its tokens in this shard} (a document's chunks joined in order); a truncated or
    corrupt tar is a UserError naming the offset."""
    from webdataset.tariterators import tar_file_iterator

    parts: dict[int, list[tuple[int, np.ndarray]]] = {}
    stream = io.BytesIO(data)
    try:
        for member in tar_file_iterator(stream):
            key, _, ext = member["fname"].partition(".")
            if ext == "tokens" or (ext.endswith(".tokens") and ext.startswith("c")):
                chunk = 0 if ext == "tokens" else int(ext[1:].partition(".")[0])
                parts.setdefault(int(key), []).append((chunk, np.frombuffer(member["data"], dtype=dtype)))
    except (tarfile.TarError, ValueError, EOFError, OSError) as e:
        raise UserError(f"shard {where} is truncated or corrupt near byte offset {stream.tell()} "
                        f"({str(e).split(' @ ')[0]}); re-create or re-download it") from None
    in_order = {doc: [a for _, a in sorted(arrays, key=lambda p: p[0])] for doc, arrays in parts.items()}
    return {doc: arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            for doc, arrays in in_order.items()}
