"""Gated MLP: ``W_down( act(W_gate x) * (W_up x) )``.

``act`` is GeLU (tanh form) in Griffin (arXiv 2402.19427, Sec. 2.2), exact GeLU in Zamba and SiLU
in SwiGLU models (Llama; Shazeer, arXiv 2002.05202). A use of a shared block may pass a
``chimera.models.lora.LoRA`` with two outputs: ``W_gate x + B_gate A x`` and ``W_up x + B_up A x``.

TP: ``W_gate`` and ``W_up`` split their output features (column parallel), ``W_down`` its input
features (row parallel); the hidden activations never leave their rank. Position-wise: context
parallelism needs nothing from other shards.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from chimera.models.spec import Build, ContextParallel, SublayerConfig, SublayerSpec, divisibility
from chimera.parallel.dims import ParallelDims
from chimera.parallel.layers import ColumnParallel, RowParallel
from chimera.parallel.sharding import normal

Activation = Literal["gelu_tanh", "gelu", "silu"]

ACTIVATIONS = {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "silu": F.silu}


class MLPConfig(SublayerConfig):
    """The ``model:`` fields of the gated MLP (symbol ``-``)."""

    mlp_hidden: int | None = Field(None, ge=1, description="width of each branch of the gated MLP")
    mlp_activation: Activation = Field("gelu_tanh", description="gate of the gated MLP")
    linear_bias: bool = Field(False, description="biases on recurrent-block, attention-output and MLP projections")

    @model_validator(mode="after")
    def _resolve(self):
        if self.mlp_hidden is None:
            raise ValueError("the pattern has MLP sublayers ('-'): set mlp_hidden")
        return self


class GatedMLP(nn.Module):
    ROW_POSITIONS = True  # step takes each row's position (chimera.models.positions)
    def __init__(self, d_model: int, hidden: int, *, init_std: float, out_std: float, dims: ParallelDims,
                 activation: str = "gelu_tanh", bias: bool = False):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        # W_gate, W_up [hidden / tp, d]: split along dim 0; W_down [d, hidden / tp]: split along dim 1
        self.gate = ColumnParallel(d_model, hidden, dims, init=normal(init_std), bias=bias)
        self.up = ColumnParallel(d_model, hidden, dims, init=normal(init_std), bias=bias)
        self.down = RowParallel(hidden, d_model, dims, init=normal(out_std), bias=bias)

    def forward(self, x: torch.Tensor, docs=None, lora=None) -> torch.Tensor:  # [s, b, d] -> [s, b, d]
        gate, up = self.gate(x), self.up(x)
        if lora is not None:
            delta_gate, delta_up = lora(x)
            gate, up = gate + delta_gate, up + delta_up
        return self.down(self.act(gate) * up)

    def init_state(self, batch: int, max_len: int):
        return None

    def step(self, x: torch.Tensor, state, pos: int, lora=None) -> torch.Tensor:
        return self.forward(x, lora=lora)

    def prefill(self, x: torch.Tensor, max_len: int, lora=None):  # per token: no state
        return self.forward(x, lora=lora), None


def build(c: MLPConfig, b: Build) -> GatedMLP:
    return GatedMLP(c.d_model, c.mlp_hidden, init_std=b.init_std, out_std=b.out_std, dims=b.dims,
                    activation=c.mlp_activation, bias=c.linear_bias)


def flops_per_token(c: MLPConfig, seq_len: int) -> dict[str, float]:
    """``W_gate``, ``W_up``, ``W_down``: 2 per weight."""
    return {"projections": 2.0 * 3 * c.d_model * c.mlp_hidden}


SPECS = (SublayerSpec("-", "gated MLP", MLPConfig, build,
                      lambda c, tp: divisibility(tp, {"model.mlp_hidden": c.mlp_hidden}),
                      lambda c: ContextParallel("token"), flops_per_token=flops_per_token),)
