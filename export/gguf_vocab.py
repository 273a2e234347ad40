"""A run's tokenizer as GGUF metadata (``tokenizer.ggml.*``), the way llama.cpp reads a vocabulary.

llama.cpp tokenizes with the vocabulary stored in the file, so every GGUF carries one:

* an HF ``tokenizer.json`` byte-level BPE (what ``chimera data train-tokenizer`` trains; GPT-2's, Llama 3's):
  llama.cpp's ``gpt2`` vocabulary, its tokens (byte-level strings such as ``Ġthe``), merges and special tokens as
  they are; the pre-tokenizer by its regex: GPT-2's (``ByteLevel``'s own) is ``tokenizer.ggml.pre = gpt-2``,
  Llama 3's ``llama-bpe``.
* an HF byte-fallback BPE over ``▁``-spaced text (Llama 2's, Mistral's): llama.cpp's ``llama`` (SentencePiece)
  vocabulary, with scores that make it merge in the merges' order (``_sentencepiece_vocab``), ``<0xXX>`` byte
  tokens, ``add_space_prefix`` as the file's normaliser says.
* ``bytes``: token ``b`` is the byte ``b``. In byte-level BPE a byte is the one character GPT-2's byte-to-unicode
  table gives it, so the vocabulary is those 256 characters in byte order plus the separator (id 256), and no
  merge can ever apply: llama.cpp splits any text into its UTF-8 bytes and looks each up, giving ids equal to the
  byte values, as Chimera does; decoding maps the characters back to bytes. llama.cpp refuses a BPE vocabulary
  without merges, so the file holds one that never fires (the separator with itself: special tokens are cut out
  before BPE, and BPE starts from single characters).
* ``dna``: the tokens ``A C G T N`` and the separator, likewise without merges. llama.cpp does not fold
  soft-masked lower case onto them as Chimera does: give it upper-case sequence.

Token ids past the tokenizer's vocabulary (a model's vocabulary may be rounded up) are ``[PAD{i}]``, unused, as
llama.cpp's converter writes them. No BOS is added (Chimera encodes without special tokens); the separator is EOS
(and BOS, as in GPT-2). Tokenizers llama.cpp would split or normalise differently (other pre-tokenizers or
normalisers, WordPiece, Unigram) are refused (``refusal``), never written with another tokenization.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFWriter, TokenType

from chimera.data.tokenizers import ByteTokenizer, DNATokenizer, HFTokenizer, get_tokenizer
from chimera.errors import UserError

SEPARATOR = "<|endoftext|>"  # the document separator's token text when the tokenizer has none of its own


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]  # by id, exactly the model's vocabulary size
    types: list[int]  # gguf.TokenType by id
    eos_id: int
    model: str = "gpt2"  # llama.cpp's tokenizer kind: gpt2 (byte-level BPE) or llama (SentencePiece)
    merges: list[str] | None = None  # gpt2: "left right", by rank
    pre: str | None = "gpt-2"  # gpt2: llama.cpp's pre-tokenizer
    scores: list[float] | None = None  # llama: by id, the higher merged first
    unk_id: int | None = None  # llama
    add_space_prefix: bool = False  # llama


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, every other byte for the
    next unused code point from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _without_merges(symbols: list[str], separator: str) -> dict:
    """A vocabulary of single symbols and a separator, with the one merge that never applies."""
    return {"tokens": [*symbols, separator], "types": [TokenType.NORMAL] * len(symbols) + [TokenType.CONTROL],
            "merges": [f"{separator} {separator}"]}


def _bytes_vocab(tok: ByteTokenizer) -> dict:
    alphabet = byte_to_unicode()
    assert tok.eos_id == 256
    return _without_merges([alphabet[b] for b in range(256)], SEPARATOR)


def _dna_vocab(tok: DNATokenizer) -> dict:
    assert tok.eos_id == len(tok.alphabet)
    return _without_merges(list(tok.alphabet), SEPARATOR)


# llama.cpp's pre-tokenizers (``tokenizer.ggml.pre``) by the regex that splits words before byte-level BPE
PRE_TOKENIZER_REGEXES = {
    "gpt-2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def llama_cpp_pre_tokenizer(pre: dict) -> str | None:
    """llama.cpp's name for a ``tokenizer.json`` pre-tokenizer: ``ByteLevel`` with its own (GPT-2) regex, or a
    ``Split`` on a known regex then ``ByteLevel`` without one; None for any other (or one adding a prefix space)."""
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    *splits, last = steps or [{}]
    if last.get("type") != "ByteLevel" or last.get("add_prefix_space"):
        return None
    if not splits:
        return "gpt-2" if last.get("use_regex", True) else None
    if len(splits) != 1 or last.get("use_regex", True):
        return None
    split = splits[0]
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    regex = (split.get("pattern") or {}).get("Regex")
    return next((name for name, known in PRE_TOKENIZER_REGEXES.items() if regex == known), None)


def _tokens_by_id(tok: HFTokenizer, spec: dict, where: str) -> tuple[list[str], list[int]]:
    """Every token of a ``tokenizer.json`` by id with its type (added tokens: control when special), the separator
    Chimera adds when the file has none (the next id) included."""
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    types = {i: TokenType.NORMAL for i in by_id}
    for added in spec.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    if tok.eos_id not in by_id:  # HFTokenizer added it
        by_id[tok.eos_id], types[tok.eos_id] = SEPARATOR, TokenType.CONTROL
    if sorted(by_id) != list(range(len(by_id))):
        raise UserError(f"{where} has gaps in its token ids; GGUF export needs ids 0..{len(by_id) - 1}")
    return [by_id[i] for i in range(len(by_id))], [types[i] for i in range(len(by_id))]


def _merges(spec: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["model"].get("merges") or []]


def _byte_level_vocab(tok: HFTokenizer, spec: dict, where: str) -> dict:
    pre = llama_cpp_pre_tokenizer(spec.get("pre_tokenizer") or {})
    if pre is None:
        raise UserError(f"{where} pre-tokenizes with {json.dumps(spec.get('pre_tokenizer'))}; GGUF export knows the "
                        f"byte-level pre-tokenizers llama.cpp calls {' and '.join(PRE_TOKENIZER_REGEXES)} only")
    if spec.get("normalizer"):
        raise UserError(f"{where} normalises its input ({spec['normalizer'].get('type')}), which llama.cpp's gpt2 "
                        "vocabulary does not; GGUF export refused")
    tokens, types = _tokens_by_id(tok, spec, where)
    merges = [f"{a} {b}" for a, b in _merges(spec)] or [f"{SEPARATOR} {SEPARATOR}"]  # see the module docstring
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre}


SPACE = "\u2581"  # SentencePiece's visible space


def _space_prefix(spec: dict) -> bool | None:
    """Whether a SentencePiece-style ``tokenizer.json`` turns spaces into ``▁`` and prepends one (True) or only
    turns them (False), the two ways transformers writes it; None when it does anything else."""
    norm, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    if norm and not pre:
        steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
        prepend = [s for s in steps if s.get("type") == "Prepend"]
        replace = [s for s in steps if s.get("type") == "Replace"]
        if (len(steps) != len(prepend) + len(replace) or len(replace) != 1 or len(prepend) > 1
                or replace[0].get("pattern") != {"String": " "} or replace[0].get("content") != SPACE
                or any(p.get("prepend") != SPACE for p in prepend) or steps[-1] not in replace):
            return None
        return bool(prepend)
    if pre and not norm and pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE \
            and not pre.get("split", True) and pre.get("prepend_scheme") in ("first", "never"):
        return pre["prepend_scheme"] == "first"
    return None


def _sentencepiece_vocab(tok: HFTokenizer, spec: dict, where: str) -> dict:
    """A byte-fallback BPE over ``▁``-spaced text (Llama 2's, Mistral's) as llama.cpp's SentencePiece vocabulary.
    llama.cpp merges the adjacent pair whose concatenation has the highest score; each token's score is minus the
    rank of the merge that makes it, so it merges in the merges' order. Bytes without a token fall back to
    ``<0xXX>`` tokens in both."""
    prefix = _space_prefix(spec)
    if prefix is None:
        raise UserError(f"{where} prepares its text with {json.dumps(spec.get('normalizer'))} / "
                        f"{json.dumps(spec.get('pre_tokenizer'))}; GGUF export knows the SentencePiece-style ones "
                        "(spaces as \u2581, optionally one prepended) only")
    tokens, types = _tokens_by_id(tok, spec, where)
    score = {a + b: -float(rank) for rank, (a, b) in reversed(list(enumerate(_merges(spec))))}
    unk = spec["model"].get("unk_token")
    for i, t in enumerate(tokens):
        if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = TokenType.BYTE
        elif t == unk:
            types[i] = TokenType.UNKNOWN
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in tokens]
    if missing:
        raise UserError(f"{where} falls back to bytes but has no token {missing[0]}; GGUF export refused")
    return {"tokens": tokens, "types": types, "model": "llama", "pre": None,
            "scores": [score.get(t, 0.0) if ty == TokenType.NORMAL and len(t) > 1 else 0.0
                       for t, ty in zip(tokens, types, strict=True)],
            "unk_id": tokens.index(unk) if unk in tokens else None, "add_space_prefix": prefix}


def _hf_vocab(tok: HFTokenizer) -> dict:
    spec = json.loads(Path(tok.path).read_text())
    where = f"tokenizer {tok.path}"
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{where} is a {model.get('type')} tokenizer; GGUF export writes BPE tokenizers only "
                        "(byte-level: llama.cpp's gpt2 vocabulary; byte-fallback: its llama one)")
    return (_sentencepiece_vocab if model.get("byte_fallback") else _byte_level_vocab)(tok, spec, where)


def vocab_of(spec: str, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of a tokenizer spec for a model of ``vocab_size`` ids (UserError when it has none)."""
    tok = get_tokenizer(spec)
    if isinstance(tok, ByteTokenizer):
        fields = _bytes_vocab(tok)
    elif isinstance(tok, DNATokenizer):
        fields = _dna_vocab(tok)
    else:
        fields = _hf_vocab(tok)
    tokens, types = fields.pop("tokens"), fields.pop("types")
    if len(tokens) > vocab_size:
        raise UserError(f"tokenizer {spec!r} has {len(tokens)} tokens but the model only {vocab_size} embeddings; "
                        "GGUF export refused")
    pads = range(len(tokens), vocab_size)
    if fields.get("scores") is not None:
        fields["scores"] = fields["scores"] + [0.0] * len(pads)
    return Vocab(tokens=tokens + [f"[PAD{i}]" for i in pads], types=types + [TokenType.UNUSED] * len(pads),
                 eos_id=tok.eos_id, **fields)


def refusal(spec: str, vocab_size: int) -> str | None:
    try:
        vocab_of(spec, vocab_size)
    except UserError as e:
        return str(e)
    return None


def add_vocab(writer: GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.model == "gpt2":
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_merges(vocab.merges)
    else:
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.add_space_prefix)
        if vocab.unk_id is not None:
            writer.add_unk_token_id(vocab.unk_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_bos_token_id(vocab.eos_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
