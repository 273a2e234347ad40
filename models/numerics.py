"""Numerics of particular released models: how embeddings, residual branches, norms and logits are scaled.

The defaults leave a model unchanged. RecurrentGemma sets ``scale_embeddings``, ``norm_offset`` and
``logits_soft_cap``; Granite-4.0-H sets its muP multipliers (``embedding_multiplier``,
``residual_multiplier``, ``logits_divisor``); RWKV sets ``norm: layernorm`` and ``embedding_norm``. The generic
LM applies them and knows no model::

    x      = embed(ids) * embedding_multiplier [* bf16(sqrt(d_model)) with scale_embeddings]
    x      = norm(x)                                          # only with embedding_norm (RWKV's ln0)
    x      = x + residual_multiplier * f(norm(x))             # every sublayer
    norm   : rmsnorm: y * w, or y * (1 + w) with norm_offset (w starts at 0), y = x / rms(x)
             layernorm: (x - mean(x)) / sqrt(var(x) + eps) * w + b
    logits = cap * tanh((h W^T / logits_divisor) / cap)      # the soft cap only with logits_soft_cap
"""

from __future__ import annotations

from functools import cached_property
from typing import Literal

import torch
from pydantic import Field

from chimera.models.spec import SublayerConfig


class Numerics(SublayerConfig):
    """The model-wide scalars, resolved once (``embedding_scale``)."""

    scale_embeddings: bool = Field(False, description="multiply embeddings by sqrt(d_model), rounded to bf16")
    norm_offset: bool = Field(False, description="RMSNorm scales by (1 + w), w initialised to 0")
    norm: Literal["rmsnorm", "layernorm"] = Field(
        "rmsnorm", description="the norm before every sublayer and the head: rmsnorm, or layernorm (with a bias)")
    embedding_norm: bool = Field(False, description="normalise the embeddings before the first sublayer (RWKV's ln0)")
    logits_soft_cap: float | None = Field(None, gt=0, description="logits -> cap * tanh(logits / cap)")
    embedding_multiplier: float = Field(1.0, gt=0, description="embeddings are multiplied by this")
    residual_multiplier: float = Field(
        1.0, gt=0, description="each sublayer's output is multiplied by this before the residual add"
    )
    logits_divisor: float = Field(1.0, gt=0, description="logits are divided by this (Granite's logits_scaling)")

    @cached_property
    def embedding_scale(self) -> float | None:
        """RecurrentGemma's sqrt(d) as a bf16 constant (the rounding is part of the model), or None."""
        if not self.scale_embeddings:
            return None
        return float(torch.tensor(self.d_model**0.5, dtype=torch.bfloat16, device="cpu"))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding_multiplier != 1.0:  # Granite
            x = x * self.embedding_multiplier
        scale = self.embedding_scale
        return x if scale is None else x * scale

    def residual(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return x + (out if self.residual_multiplier == 1.0 else out * self.residual_multiplier)

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.logits_divisor != 1.0:  # Granite's logits_scaling: a division, as there
            logits = logits / self.logits_divisor
        cap = self.logits_soft_cap
        return logits if cap is None else cap * torch.tanh(logits / cap)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Recurrences, routers and selection inputs run in fp32 (or wider) even when activations are bf16."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
