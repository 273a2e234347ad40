"""BaseConv: the gated short convolution of Based's architecture (Arora et al., arXiv 2402.18668, Sec. 4; the
``BaseConv`` mixer of its reference code, from the Zoology/H3 line of gated convolutions)::

    u   = W_conv x + b_conv,   g = W_gate x + b_gate          # [width] each; width = 2 d_model in Based
    y   = W_out (SiLU(Conv1D_k(u)) * g) + b_out               # depthwise causal conv of width k = 3, no bias

In Based's released models most layers (17 of 27 at 360M) mix tokens this way; the others are Based linear
attention (``B``) and sliding-window softmax attention (``L``). The reference's ``in_proj`` ``[2 width, d]``
holds ``W_conv`` (rows ``:width``) and ``W_gate`` (rows ``width:``); its ``expand_proj = 4`` is ``width = 2 d``.

Tensor parallelism splits the ``width`` channels: ``W_conv``, ``W_gate`` column parallel, the conv with them,
``W_out`` row parallel; the conv is per channel, so no communication. Context parallelism: a rank's first
outputs read the ``k - 1`` inputs before its chunk (a halo, ``chimera.models.conv``); packed documents keep the
conv's taps within a document. Decoding keeps the last ``k - 1`` inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from chimera.models.conv import CausalConv1d
from chimera.models.spec import Build, ContextParallel, SublayerConfig, SublayerSpec, divisibility
from chimera.parallel.dims import ParallelDims
from chimera.parallel.layers import ColumnParallel, RowParallel
from chimera.parallel.sharding import normal


class BaseConvConfig(SublayerConfig):
    """The ``model:`` fields of the BaseConv mixer (symbol ``V``)."""

    baseconv_width: int | None = Field(None, ge=1, description="BaseConv: width of the convolved and the gating "
                                       "branch (resolved: 2 x d_model, Based's expand_proj=4)")
    baseconv_bias: bool = Field(True, description="BaseConv: biases on its input and output projections")
    conv_kernel: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _resolve(self):
        self.baseconv_width = self.baseconv_width or 2 * self.d_model
        return self


class BaseConv(nn.Module):
    """Symbol ``V``: ``[s, b, d] -> [s, b, d]`` over this rank's channels."""

    ROW_POSITIONS = True  # step takes each row's position (chimera.models.positions)

    def __init__(self, d_model: int, width: int, kernel: int, *, bias: bool = True, init_std: float, out_std: float,
                 dims: ParallelDims):
        super().__init__()
        # W_conv, W_gate [width / tp, d] (+ biases [width / tp]): split along dim 0
        self.in_conv = ColumnParallel(d_model, width, dims, init=normal(init_std), bias=bias)
        self.in_gate = ColumnParallel(d_model, width, dims, init=normal(init_std), bias=bias)
        # [width / tp, k]: split along dim 0, with the channels
        self.conv = CausalConv1d(dims.local(width, "baseconv_width"), kernel, bias=False, dims=dims)
        # W_out [d, width / tp]: split along dim 1; output all-reduced (or reduce-scattered)
        self.out_proj = RowParallel(width, d_model, dims, init=normal(out_std), bias=bias)

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:  # [s, b, d] -> [s, b, d]
        """``docs``: packed documents; no tap of the conv reaches into another document."""
        return self.out_proj(F.silu(self.conv(self.in_conv(x), docs)) * self.in_gate(x))

    def init_state(self, batch: int, max_len: int):
        w = self.conv.weight
        return {"conv": self.conv.init_state(batch, device=w.device, dtype=w.dtype)}

    def prefill(self, x: torch.Tensor, max_len: int):  # x: [s, b, d] -> (out, state)
        u = self.in_conv(x)
        return self.out_proj(F.silu(self.conv(u)) * self.in_gate(x)), {"conv": self.conv.state_after(u)}

    def step(self, x: torch.Tensor, state, pos: int) -> torch.Tensor:  # x: [1, b, d]
        u, state["conv"] = self.conv.step(self.in_conv(x)[0], state["conv"])
        return self.out_proj(F.silu(u).unsqueeze(0) * self.in_gate(x))


def build(c: BaseConvConfig, b: Build) -> BaseConv:
    return BaseConv(c.d_model, c.baseconv_width, c.conv_kernel, bias=c.baseconv_bias, init_std=b.init_std,
                    out_std=b.out_std, dims=b.dims)


def flops_per_token(c: BaseConvConfig, seq_len: int) -> dict[str, float]:
    """``W_conv``, ``W_gate`` and ``W_out`` (2 per weight), and the depthwise conv's ``k`` taps per channel."""
    w = c.baseconv_width
    return {"projections": 2.0 * (2 * c.d_model * w + w * c.d_model), "conv": 2.0 * c.conv_kernel * w}


SPECS = (SublayerSpec("V", "BaseConv gated short convolution (Based)", BaseConvConfig, build,
                      lambda c, tp: divisibility(tp, {"model.baseconv_width": c.baseconv_width}),
                      lambda c: ContextParallel("halo", halo=c.conv_kernel - 1), flops_per_token=flops_per_token),)
