"""Generation over each mixer's cached decoding state (O(1) per token for recurrences).

A prompt is prefilled in one parallel pass (``model.prefill``), then decoded one token at a time (``model.step``).
Sequences decode together in a ``DecodeBatch``: each row is one sequence with its own position, sampling settings and
random generator; a row joins by prefilling its prompt alone and stacking that state onto the batch's
(``chimera.models.batch_state``), and leaves between steps. Rows at different positions step together with
``pos = LongTensor [b]`` (``CausalLM.step``), so every row gets the tokens it would get decoded alone.

``TextStream`` turns a row's tokens into text as they come: only whole UTF-8 characters, never text that may still
turn out to begin a stop string, and the text cut before the first stop string.

Any model with ``init_state``, ``prefill`` and ``step`` runs here (the ONNX runtime model too); rows at one position
get an ``int`` position, as such models take.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from chimera.models.batch_state import stack_states, state_layout, take_rows

# ---- sampling ----------------------------------------------------------------------------------------------------

def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ``[b]`` from logits ``[b, V]``: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@dataclass(frozen=True)
class Sampling:
    """How a row's next token is drawn: greedy at ``temperature`` 0, else top-k / nucleus sampling."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None


def sampling_problem(max_new_tokens, temperature, top_k, top_p, names=None) -> str | None:
    """What is wrong with these settings, in one line naming the setting (``names``: how the caller spells them,
    e.g. ``--top-k``), or None."""
    names = names or {}

    def name(key):
        return names.get(key, key)

    checks = [
        ("max_new_tokens", max_new_tokens, int, lambda v: v >= 1, "must be at least 1"),
        ("temperature", temperature, (int, float), lambda v: v >= 0, "must be >= 0 (0 is greedy)"),
        ("top_k", top_k, int, lambda v: v >= 1, "must be at least 1 (or leave it out: no top-k filter)"),
        ("top_p", top_p, (int, float), lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ]
    for key, value, kind, ok, rule in checks:
        if value is None and key in ("top_k", "top_p"):
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"{name(key)} {value!r}: must be a number" if kind is not int else \
                f"{name(key)} {value!r}: must be a whole number"
        if not ok(value):
            return f"{name(key)} {value}: {rule}"
    return None


# ---- rows decoding together ---------------------------------------------------------------------------------------

@dataclass(eq=False)
class Row:
    """One sequence of a ``DecodeBatch``: its prompt, the tokens made so far, where it is."""

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    generator: torch.Generator
    position: int  # tokens held in the state (the prompt's, then each one fed back)
    logits: torch.Tensor  # [V]: for the next token
    tokens: list[int] = field(default_factory=list)  # generated
    finished: bool = False
    tag: object = None  # the caller's (e.g. a server request)


class DecodeBatch:
    """Rows decoding together through one state: ``admit`` prefills a prompt and adds its row, ``step`` gives every
    row one token (and feeds it back), ``retire`` removes a row (stop string, client gone). A row that has its
    ``max_new_tokens`` leaves by itself. ``max_len``: the longest prompt plus new tokens any row may reach."""

    def __init__(self, model, max_len: int, vocab_limit: int | None = None):
        self.model, self.max_len, self.vocab_limit = model, max_len, vocab_limit
        self.rows: list[Row] = []
        self.state = None

    def admit(self, prompts: torch.Tensor, max_new_tokens: int, sampling: Sampling, seeds: list[int],
              tags=None) -> list[Row]:
        """Prompts ``[n, t]`` (one length; prefilled in one pass) join the batch as ``n`` rows, row ``i`` sampling
        with the generator seeded ``seeds[i]``."""
        n, t = prompts.shape
        if t + max_new_tokens > self.max_len:
            raise ValueError(f"a prompt of {t} tokens and {max_new_tokens} new ones exceed max_len={self.max_len}")
        logits, state = self.model.prefill(prompts, self.max_len)
        rows = [Row(prompt=prompts[i].tolist(), max_new_tokens=max_new_tokens, sampling=sampling,
                    generator=torch.Generator().manual_seed(int(seeds[i])), position=t, logits=logits[i, -1],
                    tag=None if tags is None else tags[i]) for i in range(n)]
        self.state = state if self.state is None else stack_states([self.state, state], state_layout(self.model))
        self.rows += rows
        return rows

    def step(self) -> list[tuple[Row, int]]:
        """One token for every row, ``(row, token)``; rows reaching their ``max_new_tokens`` leave, the others take
        their token into the state."""
        made = []
        for row in self.rows:
            logits = row.logits[None].clone()
            if self.vocab_limit is not None:
                logits[:, self.vocab_limit:] = float("-inf")
            s = row.sampling
            token = int(sample_next(logits, s.temperature, s.top_k, s.top_p, row.generator)[0])
            row.tokens.append(token)
            made.append((row, token))
        self._keep([r for r in self.rows if len(r.tokens) < r.max_new_tokens])
        if self.rows:
            tokens = torch.tensor([r.tokens[-1] for r in self.rows])
            positions = [r.position for r in self.rows]
            pos = positions[0] if len(set(positions)) == 1 else torch.tensor(positions)
            logits = self.model.step(tokens, self.state, pos)
            for row, row_logits in zip(self.rows, logits):
                row.logits, row.position = row_logits, row.position + 1
        return made

    def retire(self, rows) -> None:
        """Remove ``rows`` from the batch (finished)."""
        gone = set(map(id, rows))
        self._keep([r for r in self.rows if id(r) not in gone])

    def _keep(self, kept: list[Row]) -> None:
        for row in self.rows:
            row.finished = row.finished or row not in kept
        if len(kept) == len(self.rows):
            return
        index = torch.tensor([i for i, r in enumerate(self.rows) if r in kept], dtype=torch.long)
        self.state = take_rows(self.state, state_layout(self.model), index) if kept else None
        self.rows = kept


# ---- text as it comes -----------------------------------------------------------------------------------------------

class TextStream:
    """A row's tokens -> its text, piece by piece: ``push(token)`` returns the text that is now certain (whole UTF-8
    characters; nothing that could still be the start of a stop string), ``finish()`` the rest. With stop strings the
    text ends before the first one found (``stopped`` tells)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.decode, self.stop = decode, tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.sent = 0  # characters of the text already given out
        self.stopped = False
        self.text = ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped, self.text = True, text[:cut]
            return self._send(len(self.text))
        self.text = text
        safe = len(text.rstrip("\ufffd"))  # a character whose bytes are not all here yet waits
        safe -= max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if text[:safe].endswith(s[:n])),
                    default=0)  # the start of a stop string waits
        return self._send(safe)

    def finish(self) -> str:
        return self._send(len(self.text))

    def _stop_at(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _send(self, upto: int) -> str:
        piece = self.text[self.sent: upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece


# ---- whole generations ----------------------------------------------------------------------------------------------

@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, vocab_limit: int | None = None, seed: int = 0) -> torch.Tensor:
    """Continue ``prompt [b, s0]`` by ``max_new_tokens`` tokens; returns ``[b, s0 + max_new_tokens]``. The prompt is
    prefilled in one pass; row ``i`` samples with the generator seeded ``seed + i``.

    ``vocab_limit`` masks logits of ids the tokenizer cannot produce (the padded part of the vocabulary).
    """
    b, s0 = prompt.shape
    if max_new_tokens <= 0:
        return prompt
    batch = DecodeBatch(model, s0 + max_new_tokens, vocab_limit)
    rows = batch.admit(prompt, max_new_tokens, Sampling(temperature, top_k, top_p), [seed + i for i in range(b)])
    while batch.rows:
        batch.step()
    return torch.cat([prompt, torch.tensor([r.tokens for r in rows], dtype=prompt.dtype)], dim=1)


@dataclass
class Completion:
    """One prompt's continuation: its text (cut before a stop string), tokens, and why it ended ("stop": a stop
    string, "length": ``max_new_tokens``)."""

    text: str
    tokens: list[int]
    finish_reason: str


def stream_completions(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling, *,
                       seed: int = 0, stop: tuple[str, ...] = ()) -> Iterator[tuple[int, str, Completion | None]]:
    """Prompts of any lengths (token ids), decoded together; yields ``(index, text piece, None)`` as text becomes
    certain and ``(index, "", Completion)`` when prompt ``index`` is done. Prompt ``i`` samples with ``seed + i``.
    Each prompt is prefilled alone (rows at different positions step together)."""
    batch = DecodeBatch(model, max(map(len, prompts)) + max_new_tokens, tokenizer.vocab_size)
    streams = {}
    for i, ids in enumerate(prompts):
        (row,) = batch.admit(torch.tensor([ids], dtype=torch.long), max_new_tokens, sampling, [seed + i], tags=[i])
        streams[i] = TextStream(tokenizer.decode, stop)
    while batch.rows:
        stopped = []
        for row, token in batch.step():
            stream = streams[row.tag]
            text = stream.push(token)
            if text:
                yield row.tag, text, None
            if stream.stopped:
                stopped.append(row)
        batch.retire(stopped)
        for i, stream in list(streams.items()):
            if stream.stopped or len(stream.tokens) >= max_new_tokens:
                rest = stream.finish()
                if rest:
                    yield i, rest, None
                yield i, "", Completion(stream.text, list(stream.tokens), "stop" if stream.stopped else "length")
                del streams[i]
