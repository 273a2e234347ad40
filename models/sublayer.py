"""One sublayer of the layer pattern: ``x + r * f(norm(x))`` (pre-norm residual), ``f`` the symbol's kind.

``f`` is built by the ``SublayerSpec`` the registry holds for the symbol (``chimera.models.registry``);
this file names no mixer. ``r`` is the model's residual multiplier (1 but in Granite).

Every module of the layer stack has ``forward(x, context)`` and ``step(x, state, context)`` on the
residual stream ``[s(/tp), b, d]``, ``context`` being what every sublayer of one pass may read
(``Context``: packed documents, the model's input embeddings, the decoding position).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from chimera.models import registry
from chimera.models.documents import PackedDocuments
from chimera.models.norms import RMSNorm
from chimera.models.spec import Build
from chimera.parallel.layers import enter_tensor_parallel

if TYPE_CHECKING:
    from chimera.models.config import ModelConfig


@dataclass
class Context:
    """What every sublayer of one forward pass (or one decoding step) may read besides the residual stream."""

    embeddings: torch.Tensor  # the model's input embeddings, laid out like the residual stream (Zamba reads them)
    docs: PackedDocuments | None = None  # several documents packed per sequence (forward only)
    position: int = 0  # decoding: the position of the token being decoded


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
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, sequence_parallel=build.dims.sequence_parallel,
                            offset=cfg.numerics.norm_offset)
        self.mixer = build_mixer(symbol, cfg, build)
        self.numerics = cfg.numerics

    def forward(self, x: torch.Tensor, context: Context, injected: torch.Tensor | None = None) -> torch.Tensor:
        u = x if injected is None else x + injected
        h = enter_tensor_parallel(self.norm(u), self.dims, self.dims.sequence_parallel)
        return self.numerics.residual(x, self.mixer(h, context.docs))

    def init_state(self, batch: int, max_len: int):
        return self.mixer.init_state(batch, max_len)

    def step(self, x: torch.Tensor, state, context: Context, injected: torch.Tensor | None = None) -> torch.Tensor:
        u = x if injected is None else x + injected  # x: [1, b, d], no sequence sharding
        h = enter_tensor_parallel(self.norm(u), self.dims, False)
        return self.numerics.residual(x, self.mixer.step(h, state, context.position))
