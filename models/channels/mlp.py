"""Gated MLP: ``W_down( act(W_gate x) * (W_up x) )``.

``act`` is GeLU (tanh form) in Griffin (arXiv 2402.19427, Sec. 2.2), exact GeLU in Zamba and SiLU
in SwiGLU models (Llama; Shazeer, arXiv 2002.05202). A use of a shared block may pass a
``chimera.models.lora.LoRA`` with two outputs: ``W_gate x + B_gate A x`` and ``W_up x + B_up A x``.

TP: ``W_gate`` and ``W_up`` split their output features (column parallel), ``W_down`` its input
features (row parallel); the hidden activations never leave their rank.
"""

import torch
import torch.nn.functional as F
from torch import nn

from chimera.parallel.layers import ColumnParallel, RowParallel
from chimera.parallel.sharding import normal

ACTIVATIONS = {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "silu": F.silu}


class GatedMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, *, init_std: float, out_std: float, sequence_parallel: bool,
                 activation: str = "gelu_tanh", bias: bool = False):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.gate = ColumnParallel(d_model, hidden, init=normal(init_std), bias=bias)
        self.up = ColumnParallel(d_model, hidden, init=normal(init_std), bias=bias)
        self.down = RowParallel(hidden, d_model, init=normal(out_std), sequence_parallel=sequence_parallel, bias=bias)

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
