"""A run's tokenizer as GGUF metadata (``tokenizer.ggml.*``), the way llama.cpp reads a vocabulary.

llama.cpp tokenizes with the vocabulary stored in the file, so every GGUF carries one; all three of Chimera's
tokenizers become llama.cpp's byte-level BPE (``tokenizer.ggml.model = gpt2``):

* an HF ``tokenizer.json`` byte-level BPE (what ``chimera data train-tokenizer`` trains): its tokens (byte-level
  strings such as ``Ġthe``), merges and special tokens as they are; the pre-tokenizer by its regex: GPT-2's
  (``ByteLevel``'s own) is ``tokenizer.ggml.pre = gpt-2``, Llama 3's ``llama-bpe``.
* ``bytes``: token ``b`` is the byte ``b``. In byte-level BPE a byte is the one character GPT-2's byte-to-unicode
  table gives it, so the vocabulary is those 256 characters in byte order plus the separator (id 256), and no
  merge can ever apply: llama.cpp splits any text into its UTF-8 bytes and looks each up, giving ids equal to the
  byte values, as Chimera does; decoding maps the characters back to bytes. llama.cpp refuses a BPE vocabulary
  without merges, so the file holds one that never fires (the separator with itself: special tokens are cut out
  before BPE, and BPE starts from single characters).
* ``dna``: the tokens ``A C G T N`` and the separator, likewise without merges. llama.cpp does not fold
  soft-masked lower case onto them as Chimera does: give it upper-case sequence.

Token ids past the tokenizer's vocabulary (a model's vocabulary may be rounded up) are ``[PAD{i}]``, unused, as
llama.cpp's converter writes them. No BOS is added (Chimera trains without one); the separator is EOS (and BOS,
as in GPT-2). Tokenizers llama.cpp would split or normalise differently (other pre-tokenizers, normalisers,
WordPiece, Unigram, byte-fallback BPE) are refused (``refusal``), never written with another tokenization.
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
    merges: list[str]  # "left right", by rank
    eos_id: int
    pre: str = "gpt-2"  # llama.cpp's pre-tokenizer
    model: str = "gpt2"  # llama.cpp's tokenizer kind: byte-level BPE


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


def _without_merges(symbols: list[str], separator: str) -> tuple[list[str], list[int], list[str]]:
    """A vocabulary of single symbols and a separator, with the one merge that never applies."""
    tokens = [*symbols, separator]
    types = [TokenType.NORMAL] * len(symbols) + [TokenType.CONTROL]
    return tokens, types, [f"{separator} {separator}"]


def _bytes_vocab(tok: ByteTokenizer) -> tuple[list[str], list[int], list[str]]:
    alphabet = byte_to_unicode()
    assert tok.eos_id == 256
    return _without_merges([alphabet[b] for b in range(256)], SEPARATOR)


def _dna_vocab(tok: DNATokenizer) -> tuple[list[str], list[int], list[str]]:
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


def _hf_vocab(tok: HFTokenizer) -> tuple[list[str], list[int], list[str], str]:
    """Tokens, types, merges and llama.cpp pre-tokenizer of a byte-level BPE ``tokenizer.json`` (with the separator
    Chimera adds when the file has none: the next id)."""
    spec = json.loads(Path(tok.path).read_text())
    model = spec.get("model") or {}
    where = f"tokenizer {tok.path}"
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "byte-fallback BPE" if model.get("byte_fallback") else model.get("type")
        raise UserError(f"{where} is a {kind} tokenizer; GGUF export writes byte-level BPE tokenizers only "
                        "(llama.cpp's gpt2 vocabulary)")
    pre = llama_cpp_pre_tokenizer(spec.get("pre_tokenizer") or {})
    if pre is None:
        raise UserError(f"{where} pre-tokenizes with {json.dumps(spec.get('pre_tokenizer'))}; GGUF export knows the "
                        f"byte-level pre-tokenizers llama.cpp calls {' and '.join(PRE_TOKENIZER_REGEXES)} only")
    if spec.get("normalizer"):
        raise UserError(f"{where} normalises its input ({spec['normalizer'].get('type')}), which llama.cpp's gpt2 "
                        "vocabulary does not; GGUF export refused")
    by_id = {i: t for t, i in model["vocab"].items()}
    types = {i: TokenType.NORMAL for i in by_id}
    for added in spec.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    if tok.eos_id not in by_id:  # HFTokenizer added it
        by_id[tok.eos_id], types[tok.eos_id] = SEPARATOR, TokenType.CONTROL
    if sorted(by_id) != list(range(len(by_id))):
        raise UserError(f"{where} has gaps in its token ids; GGUF export needs ids 0..{len(by_id) - 1}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:
        merges = [f"{by_id[tok.eos_id]} {by_id[tok.eos_id]}"]  # never applies (see the module docstring)
    return [by_id[i] for i in range(len(by_id))], [types[i] for i in range(len(by_id))], merges, pre


def vocab_of(spec: str, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of a tokenizer spec for a model of ``vocab_size`` ids (UserError when it has none)."""
    tok = get_tokenizer(spec)
    pre = "gpt-2"  # splitting words changes nothing when no merge applies
    if isinstance(tok, ByteTokenizer):
        tokens, types, merges = _bytes_vocab(tok)
    elif isinstance(tok, DNATokenizer):
        tokens, types, merges = _dna_vocab(tok)
    else:
        tokens, types, merges, pre = _hf_vocab(tok)
    if len(tokens) > vocab_size:
        raise UserError(f"tokenizer {spec!r} has {len(tokens)} tokens but the model only {vocab_size} embeddings; "
                        "GGUF export refused")
    pads = range(len(tokens), vocab_size)
    return Vocab(tokens=tokens + [f"[PAD{i}]" for i in pads], types=types + [TokenType.UNUSED] * len(pads),
                 merges=merges, eos_id=tok.eos_id, pre=pre)


def refusal(spec: str, vocab_size: int) -> str | None:
    try:
        vocab_of(spec, vocab_size)
    except UserError as e:
        return str(e)
    return None


def add_vocab(writer: GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_bos_token_id(vocab.eos_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
