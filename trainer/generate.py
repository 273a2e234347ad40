"""Sampling from a trained model with each mixer's cached decoding state (O(1) per token for recurrences)."""

from __future__ import annotations

import torch


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


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, vocab_limit: int | None = None, seed: int = 0) -> torch.Tensor:
    """Continue ``prompt [b, s0]`` by ``max_new_tokens`` tokens; returns ``[b, s0 + max_new_tokens]``.

    ``vocab_limit`` masks logits of ids the tokenizer cannot produce (the padded part of the vocabulary).
    """
    b, s0 = prompt.shape
    state = model.init_state(b, s0 + max_new_tokens)
    generator = torch.Generator().manual_seed(seed)
    tokens = prompt
    logits = None
    for pos in range(s0):  # prefill, one token at a time through the decoding path
        logits = model.step(prompt[:, pos], state, pos)
    for pos in range(s0, s0 + max_new_tokens):
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if pos + 1 < s0 + max_new_tokens:
            logits = model.step(nxt, state, pos)
    return tokens
