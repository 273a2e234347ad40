"""Gated MLP: ``W_down( act(W_gate x) * (W_up x) )``.

``act`` is GeLU (tanh form) in Griffin (arXiv 2402.19427, Sec. 2.2) and SiLU in SwiGLU models
(Llama; Shazeer, arXiv 2002.05202).

TP: ``W_gate`` and ``W_up`` split their output features (column parallel), ``W_down`` its input
features (row parallel); the hidden activations never leave their rank.
"""

import torch
import torch.nn.functional as F
from torch import nn

from chimera.parallel.layers import ColumnParallel, RowParallel
from chimera.parallel.sharding import normal

ACTIVATIONS = {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


class GatedMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, *, init_std: float, out_std: float, sequence_parallel: bool,
                 activation: str = "gelu_tanh", bias: bool = False):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.gate = ColumnParallel(d_model, hidden, init=normal(init_std), bias=bias)
        self.up = ColumnParallel(d_model, hidden, init=normal(init_std), bias=bias)
        self.down = RowParallel(hidden, d_model, init=normal(out_std), sequence_parallel=sequence_parallel, bias=bias)

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:  # [s, b, d] -> [s, b, d], per position
        return self.down(self.act(self.gate(x)) * self.up(x))

    def init_state(self, batch: int, max_len: int):
        return None

    def step(self, x: torch.Tensor, state, pos: int) -> torch.Tensor:
        return self.forward(x)
