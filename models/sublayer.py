"""One sublayer of the layer pattern: ``x + r * f(norm(x))`` (pre-norm residual), ``f`` the symbol's kind.

``f`` is built by the ``SublayerSpec`` the registry holds for the symbol (``chimera.models.registry``);
this file names no mixer. ``r`` is the model's residual multiplier (1 but in Granite).

Every module of the layer stack has ``forward(x, context)`` and ``step(x, state, context)`` on the
residual stream ``[s(/tp), b, d]``, ``context`` being what every sublayer of one pass may read
(``Context``: packed documents, the model's input embeddings, the decoding position, and what earlier sublayers of
the pass published for later ones).

A mixer with ``reads_context = True`` is called as ``mixer(h, docs, context=context, residual=u)``: besides its
normed input ``h`` it reads the pass's context (and may publish into ``context.published``) and the residual
stream ``u`` it is added to, laid out like ``h`` (entered into the tensor-parallel region the same way).
Decoding calls ``mixer.step(h, state, pos, context=context, residual=u)`` likewise.

Prefill (``prefill(x, context, max_len)``, one process, the whole prompt): the forward pass and the decoding state
that ``init_state`` and one ``step`` per prompt position would leave. A mixer hands its state over from its parallel
form with ``mixer.prefill(h, max_len) -> (out, state)`` (same keyword arguments as ``step``); one without that method
is stepped through the prompt (``stepped_prefill``), which gives the same state by definition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from chimera.models import registry
from chimera.models.documents import PackedDocuments
from chimera.models.norms import build_norm
from chimera.models.spec import Build
from chimera.parallel.layers import enter_tensor_parallel

if TYPE_CHECKING:
    from chimera.models.config import ModelConfig


@dataclass
class Context:
    """What every sublayer of one forward pass (or one decoding step) may read besides the residual stream."""

    embeddings: torch.Tensor  # the model's input embeddings, laid out like the residual stream (Zamba reads them)
    docs: PackedDocuments | None = None  # several documents packed per sequence (forward only)
    # decoding: the position of the token being decoded, one for the batch or each row's own (``LongTensor [b]``)
    position: int | torch.Tensor = 0
    # tensors a sublayer publishes for the later sublayers of the same pass or decoding step (one cache built once
    # and read by several layers), by name; a pass's own, never carried to the next
    published: dict = field(default_factory=dict)
    tokens: torch.Tensor | None = None  # the input token ids, [b, S] (forward: whole sequences) or [b] (decoding)
    # ids -> embeddings [s, b, d] as the model's input (its embedding, numerics and embedding norm), for sublayers that
    # keep token ids in their decoding state rather than vectors
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None
    # prefill: the decoding-step context of each prompt position, made once (``at``) and shared by the sublayers that
    # step through the prompt, so that what one publishes at position t the later ones read at t
    steps: dict = field(default_factory=dict)

    def at(self, t: int) -> Context:
        """The context ``step`` would get at prompt position ``t`` (prefill of ``[s, b, d]``, tokens ``[b, s]``)."""
        if t not in self.steps:
            self.steps[t] = Context(embeddings=self.embeddings[t: t + 1], position=t, tokens=self.tokens[:, t],
                                    embed=self.embed)
        return self.steps[t]


def build_mixer(symbol: str, cfg: ModelConfig, build: Build) -> nn.Module:
    """The module of sublayer kind ``symbol``, from its resolved config."""
    return registry.sublayers()[symbol].build(cfg.sublayer(symbol), build)


class Sublayer(nn.Module):
    """``x + r * mixer(norm(x))`` on the residual stream ``[s(/tp), b, d]``. ``injected`` (a Zamba shared
    block's output) is added to the mixer's input only: ``x + r * mixer(norm(x + injected))``."""

    def __init__(self, symbol: str, cfg: ModelConfig, build: Build):
        super().__init__()
        self.symbol = symbol
        self.dims = build.dims
        self.norm = build_norm(cfg.numerics, cfg.d_model, cfg.norm_eps, sequence_parallel=build.dims.sequence_parallel,
                               kernels=cfg.kernels)
        self.mixer = build_mixer(symbol, cfg, build)
        self.numerics = cfg.numerics
        self.reads_context = getattr(self.mixer, "reads_context", False)

    def forward(self, x: torch.Tensor, context: Context, injected: torch.Tensor | None = None) -> torch.Tensor:
        u = x if injected is None else x + injected
        sp = self.dims.sequence_parallel
        h = enter_tensor_parallel(self.norm(u), self.dims, sp)
        if self.reads_context:
            out = self.mixer(h, context.docs, context=context, residual=enter_tensor_parallel(u, self.dims, sp))
        else:
            out = self.mixer(h, context.docs)
        return self.numerics.residual(x, out)

    def init_state(self, batch: int, max_len: int):
        return self.mixer.init_state(batch, max_len)

    def step(self, x: torch.Tensor, state, context: Context, injected: torch.Tensor | None = None) -> torch.Tensor:
        u = x if injected is None else x + injected  # x: [1, b, d], no sequence sharding
        h = enter_tensor_parallel(self.norm(u), self.dims, False)
        if self.reads_context:
            out = self.mixer.step(h, state, context.position, context=context,
                                  residual=enter_tensor_parallel(u, self.dims, False))
        else:
            out = self.mixer.step(h, state, context.position)
        return self.numerics.residual(x, out)

    def prefill(self, x: torch.Tensor, context: Context, max_len: int, injected: torch.Tensor | None = None):
        """The whole prompt ``x [s, b, d]`` (no sequence sharding) -> (output, the state after its last position)."""
        u = x if injected is None else x + injected
        h = enter_tensor_parallel(self.norm(u), self.dims, False)
        extra = {"context": context, "residual": enter_tensor_parallel(u, self.dims, False)} if self.reads_context \
            else {}
        if hasattr(self.mixer, "prefill"):
            out, state = self.mixer.prefill(h, max_len, **extra)
        else:
            out, state = stepped_prefill(self.mixer, h, max_len, **extra)
        return self.numerics.residual(x, out), state


def stepped_prefill(mixer: nn.Module, h: torch.Tensor, max_len: int, context: Context | None = None,
                    residual: torch.Tensor | None = None):
    """Prefill by the definition: ``init_state``, then ``step`` at every position of ``h [s, b, d]``; for mixers
    whose state cannot be handed over from the parallel form. Returns (outputs ``[s, b, d]``, state)."""
    state = mixer.init_state(h.shape[1], max_len)
    outputs = []
    for t in range(h.shape[0]):
        if context is None:
            outputs.append(mixer.step(h[t: t + 1], state, t))
        else:
            outputs.append(mixer.step(h[t: t + 1], state, t, context=context.at(t), residual=residual[t: t + 1]))
    return torch.cat(outputs), state
