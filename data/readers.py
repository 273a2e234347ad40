"""Reading raw inputs into documents: text files and directories, JSONL(.gz), FASTA(.gz).

Each yields ``Document(text, origin)``; ``origin`` names the file and byte offset (or line) the
document came from, so a bad document can be reported precisely. Bad input follows a policy:
``fail`` raises a ``UserError`` naming the file and offset, ``skip`` drops it and counts the skip.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from chimera.errors import UserError

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text", ""}
FASTA_SUFFIXES = {".fa", ".fasta", ".fna", ".ffn", ".faa"}


@dataclass
class Document:
    text: str
    origin: str  # "path:offset" or "path:line N"


@dataclass
class BadData:
    """What the ``skip`` policy dropped, by reason."""

    policy: str = "fail"
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def report(self, reason: str, where: str, detail: str) -> None:
        message = f"{where}: {detail}"
        if self.policy == "fail":
            raise UserError(f"{message} (bad data: {reason}; set --on-error skip to skip and count such input)")
        self.counts[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no bad input"
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items())) + " skipped"


def kind_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in (".jsonl", ".json"):
        return "jsonl"
    if last in FASTA_SUFFIXES:
        return "fasta"
    return "text"


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named directly, and the files under named directories, in sorted order."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.exists():
            files.append(p)
        else:
            raise UserError(f"input {item!r} does not exist")
    return files


def _open_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix.lower() == ".gz":
        return gzip.decompress(raw)
    return raw


def _decode_utf8(data: bytes, where: str, bad: BadData) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        detail = f"byte 0x{data[e.start]:02x} at offset {e.start} is not UTF-8"
        bad.report("non-UTF-8 text", f"{where}:{e.start}", detail)
        return None


def read_text_file(path: Path, data: bytes, bad: BadData) -> Iterator[Document]:
    text = _decode_utf8(data, str(path), bad)
    if text is not None and text.strip():
        yield Document(text, f"{path}:0")


def read_jsonl(path: Path, data: bytes, bad: BadData, text_field: str) -> Iterator[Document]:
    for n, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:line {n}"
        text_line = _decode_utf8(line, where, bad)
        if text_line is None:
            continue
        try:
            record = json.loads(text_line)
        except json.JSONDecodeError as e:
            bad.report("malformed JSON", where, f"not valid JSON ({e.msg})")
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            bad.report("missing text field", where, f"no string field {text_field!r}")
            continue
        if text:
            yield Document(text, where)


def read_fasta(path: Path, data: bytes, bad: BadData) -> Iterator[Document]:
    """One document per record: the sequence lines joined, the header dropped."""
    text = _decode_utf8(data, str(path), bad)
    if text is None:
        return
    offset, header_offset, parts = 0, None, []
    for line in text.splitlines(keepends=True):
        if line.startswith(">"):
            if header_offset is not None and parts:
                yield Document("".join(parts), f"{path}:{header_offset}")
            header_offset, parts = offset, []
        elif line.strip():
            if header_offset is None:
                bad.report("malformed FASTA", f"{path}:{offset}", "sequence data before the first '>' header")
                return
            parts.append(line.strip())
        offset += len(line.encode("utf-8"))
    if header_offset is not None and parts:
        yield Document("".join(parts), f"{path}:{header_offset}")


def read_documents(paths: list[Path], bad: BadData, text_field: str = "text") -> Iterator[Document]:
    for path in paths:
        try:
            data = _open_bytes(path)
        except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
            bad.report("unreadable file", str(path), f"cannot be read ({e.__class__.__name__}: {e})")
            continue
        kind = kind_of(path)
        if kind == "jsonl":
            yield from read_jsonl(path, data, bad, text_field)
        elif kind == "fasta":
            yield from read_fasta(path, data, bad)
        else:
            yield from read_text_file(path, data, bad)
