"""Tokenizers. ``ByteTokenizer``: UTF-8 bytes are tokens 0..255; 256 separates documents."""

from __future__ import annotations

import numpy as np


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


def get_tokenizer(name: str):
    if name == "bytes":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {name!r}")
