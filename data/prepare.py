"""``chimera data prepare`` and ``chimera data train-tokenizer``: raw inputs -> tokenized dataset."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm

from chimera.data.dataset_files import write_dataset
from chimera.data.readers import BadData, expand_inputs, read_documents
from chimera.data.tokenizers import InvalidSymbol, get_tokenizer, train_bpe
from chimera.errors import UserError


def tokenized_documents(docs, tokenizer, bad: BadData):
    for doc in docs:
        try:
            yield tokenizer.encode(doc.text)
        except InvalidSymbol as e:
            path, _, start = doc.origin.rpartition(":")
            bad.report("invalid FASTA characters", doc.origin,
                       f"invalid character {e.char!r} in the sequence of the record at byte {start} "
                       f"(residue {e.offset}); allowed: A C G T N (any case)")


def prepare(inputs: list[str], tokenizer_spec: str, fmt: str, out: str, *, on_error: str = "fail",
            text_field: str = "text", shard_mb: float = 256.0, chunk_tokens: int = 1 << 20,
            progress: bool = True) -> dict:
    files = expand_inputs(inputs)
    if not files:
        raise UserError("no input files found; pass text, JSONL(.gz) or FASTA(.gz) files or directories")
    tokenizer = get_tokenizer(tokenizer_spec)
    bad = BadData(on_error)
    started = time.perf_counter()
    bar = tqdm(desc="preparing", unit=" tok", unit_scale=True, disable=None if progress else True, file=sys.stderr)
    docs = tokenized_documents(read_documents(files, bad, text_field), tokenizer, bad)
    manifest = write_dataset(docs, tokenizer, fmt, Path(out), shard_bytes=int(shard_mb * (1 << 20)),
                             chunk_tokens=chunk_tokens, on_document=bar.update)
    bar.close()
    manifest_path = Path(out) / "manifest.json"
    elapsed = time.perf_counter() - started
    parts = len(manifest["shards"]) if fmt == "webdataset" else len(manifest["store"]["files"])
    unit = "shards" if fmt == "webdataset" else "store files"
    print(f"prepared {manifest['documents']:,} documents, {manifest['tokens']:,} tokens from {len(files)} files "
          f"in {elapsed:.1f}s -> {out} ({parts} {unit}, tokenizer {tokenizer.name}); {bad.summary()}")
    manifest["bad_data"] = dict(bad.counts)
    if bad.total:
        import json

        stored = json.loads(manifest_path.read_text())
        stored["bad_data"] = {"skipped": dict(bad.counts), "examples": bad.examples}
        manifest_path.write_text(json.dumps(stored, indent=1))
    return manifest


def train_tokenizer(inputs: list[str], vocab_size: int, out: str, text_field: str = "text") -> Path:
    if vocab_size < 300:
        raise UserError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least 300 (256 bytes + merges)")
    if Path(out).exists():
        raise UserError(f"--out {out!r} already exists; choose a new path")
    bad = BadData("skip")
    texts = (doc.text for doc in read_documents(expand_inputs(inputs), bad, text_field))
    path = train_bpe(texts, vocab_size, out)
    print(f"trained a byte-level BPE of {vocab_size} tokens -> {path}; {bad.summary()}")
    return path
