"""Shared blocks as ordinary sublayers (``shared_block_style: residual``, the default).

Symbol ``i`` in the pattern runs ``model.shared_blocks[i]``, a short pattern of its own (e.g.
``'*-'``), whose sublayers are ordinary pre-norm residual sublayers. The block's parameters exist
once, in ``CausalLM.shared``, and every use runs those same tensors, so their gradients add up over
the uses (the shared attention block of Zamba, here without Zamba's input concat). The block is held
outside each use's module tree, so its parameters have one name; each use keeps its own decoding state.
Tensor and context parallelism: those of the block's sublayers.
"""

from __future__ import annotations

import torch
from torch import nn

from chimera.models.spec import SharedBlockStyle, SublayerConfig
from chimera.models.sublayer import Context, Sublayer


class SharedUse(nn.Module):
    """One use of a shared block: its sublayers in turn, on the residual stream."""

    def __init__(self, block: nn.ModuleList, index: int):
        super().__init__()
        self.index = index
        self._block = (block,)  # a tuple: not registered as a child

    @property
    def block(self) -> nn.ModuleList:
        return self._block[0]

    def forward(self, x: torch.Tensor, context: Context) -> torch.Tensor:
        for sublayer in self.block:
            x = sublayer(x, context)
        return x

    def init_state(self, batch: int, max_len: int):
        return [sublayer.init_state(batch, max_len) for sublayer in self.block]

    def step(self, x: torch.Tensor, state, context: Context) -> torch.Tensor:
        for sublayer, sub_state in zip(self.block, state):
            x = sublayer.step(x, sub_state, context)
        return x

    def prefill(self, x: torch.Tensor, context: Context, max_len: int):
        state = []
        for sublayer in self.block:
            x, sub_state = sublayer.prefill(x, context, max_len)
            state.append(sub_state)
        return x, state


class ResidualStyleConfig(SublayerConfig):
    """No fields of its own."""


STYLE = SharedBlockStyle(
    name="residual",
    summary="a shared block's sublayers are ordinary pre-norm residual sublayers",
    config=ResidualStyleConfig,
    build_block=lambda cfg, index, build: nn.ModuleList(Sublayer(s, cfg, build) for s in cfg.shared_blocks[index]),
    build_use=lambda block, index, fed, cfg, build: SharedUse(block, index),
    feeds_next=False,
    check=lambda cfg: None,
    check_tensor_parallel=lambda config, tp: None,
)
