"""Tokenizers: text or sequence in, token ids out. Each has a ``name``, ``vocab_size``, ``eos_id``
(the document separator) and an ``identity()`` recorded in dataset manifests and checkpoints.

* ``bytes``: UTF-8 bytes are tokens 0..255; 256 separates documents.
* ``dna``: nucleotides A C G T and N (unknown) for genomic models; lower case is soft-masked
  sequence and maps to the same ids; 5 separates documents.
* a ``tokenizer.json`` (HF ``tokenizers``): any trained tokenizer, e.g. a BPE trained on the
  input with ``chimera data train-tokenizer``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from chimera.errors import UserError


class ByteTokenizer:
    name = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        """Bytes back to text; separators become newlines, ids past the vocabulary are dropped."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                out.append(i)
            elif i == self.eos_id:
                out += b"\n"
        return out.decode("utf-8", errors="replace")

    def identity(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class InvalidSymbol(ValueError):
    """A character the tokenizer cannot encode; ``offset`` is its index in the input."""

    def __init__(self, char: str, offset: int):
        super().__init__(f"invalid character {char!r} at offset {offset}")
        self.char, self.offset = char, offset


class DNATokenizer:
    name = "dna"
    alphabet = "ACGTN"
    vocab_size = 6
    eos_id = 5

    def __init__(self):
        table = np.full(256, 255, dtype=np.uint8)
        for i, c in enumerate(self.alphabet):
            table[ord(c)] = table[ord(c.lower())] = i
        self._table = table

    def encode(self, seq: str | bytes) -> np.ndarray:
        data = seq.encode("ascii", errors="replace") if isinstance(seq, str) else seq
        ids = self._table[np.frombuffer(data, dtype=np.uint8)]
        bad = np.flatnonzero(ids == 255)
        if len(bad):
            raise InvalidSymbol(chr(data[bad[0]]), int(bad[0]))
        return ids.astype(np.uint16)

    def decode(self, ids) -> str:
        return "".join(self.alphabet[i] if i < 5 else "\n" for i in map(int, ids))

    def identity(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class HFTokenizer:
    """A ``tokenizer.json`` of HF ``tokenizers``; the separator is its ``eos_token`` (added if absent)."""

    def __init__(self, path: str | Path, eos_token: str = "<|endoftext|>"):
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises bare Exceptions for malformed files
            raise UserError(f"{path} is not a readable tokenizer.json ({str(e).splitlines()[0]})") from None
        if self._tok.token_to_id(eos_token) is None:
            self._tok.add_special_tokens([eos_token])
        self.eos_token, self.eos_id = eos_token, self._tok.token_to_id(eos_token)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.name = f"tokenizer.json:{path.name}"
        self._sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        self.path = path

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def identity(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "sha256": self._sha256}


def train_bpe(texts, vocab_size: int, out: str | Path, eos_token: str = "<|endoftext|>") -> Path:
    """Train a byte-level BPE on an iterator of texts; write ``tokenizer.json`` to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out


def get_tokenizer(spec: str):
    """``bytes``, ``dna``, or the path of a ``tokenizer.json``."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "dna":
        return DNATokenizer()
    if spec.endswith(".json"):
        if not Path(spec).is_file():
            raise UserError(f"tokenizer file {spec!r} does not exist")
        return HFTokenizer(spec)
    raise UserError(f"unknown tokenizer {spec!r}; use bytes, dna, or the path of a tokenizer.json")


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32
