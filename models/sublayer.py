"""Sublayers, one per symbol of the layer pattern: ``x + f(norm(x))`` (pre-norm residual).

``build_mixer`` maps a symbol to its module; adding an architecture adds a symbol here and a
mixer file in ``mixers/``. The symbols and their meaning are listed in ``chimera.configs.schema``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from chimera.configs.schema import ModelConfig
from chimera.models.mixers.attention import Attention
from chimera.models.mixers.mamba import MambaMixer
from chimera.models.mixers.mamba2 import Mamba2Mixer
from chimera.models.mixers.rglru import RecurrentBlock
from chimera.models.mlp import GatedMLP
from chimera.models.moe import MoE
from chimera.models.norms import RMSNorm
from chimera.parallel.layers import TPLayout, enter_tensor_parallel


def build_mixer(symbol: str, cfg: ModelConfig, tp: TPLayout) -> nn.Module:
    # Output projections are scaled down with depth (GPT-2 style) so the residual stream's variance stays O(1).
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * len(cfg.layers))
    if symbol == "R":
        return RecurrentBlock(cfg.d_model, cfg.lru_width, cfg.lru_heads, cfg.conv_kernel, init_std=std,
                              out_std=out_std, tp=tp, bias=cfg.linear_bias,
                              reset_unnormalized=cfg.rglru_reset_unnormalized)
    if symbol in ("L", "*"):
        return Attention(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_size,
                         window=cfg.window if symbol == "L" else None, rope_base=cfg.rope_base,
                         rope_fraction=cfg.rope_fraction, init_std=std, out_std=out_std, tp=tp,
                         out_bias=cfg.linear_bias or cfg.attention_bias, qkv_bias=cfg.attention_bias,
                         scale=cfg.attention_scale)
    if symbol == "m":
        return MambaMixer(cfg.d_model, cfg.ssm_state, cfg.conv_kernel, cfg.ssm_expand, cfg.ssm_dt_rank or "auto",
                          dt_bc_norm=cfg.ssm_dt_bc_norm, heads=cfg.ssm_heads, norm_eps=cfg.norm_eps, init_std=std,
                          out_std=out_std, tp=tp)
    if symbol == "M":
        return Mamba2Mixer(cfg.d_model, d_state=cfg.ssm_state, d_conv=cfg.conv_kernel, expand=cfg.ssm_expand,
                           head_dim=cfg.ssm_head_dim, n_groups=cfg.ssm_groups, chunk_size=cfg.ssm_chunk,
                           norm_eps=cfg.ssm_norm_eps or cfg.norm_eps, dt_min=cfg.ssm_dt_min, init_std=std,
                           out_std=out_std, tp=tp)
    if symbol == "E":
        return MoE(cfg.d_model, cfg.moe_hidden or cfg.mlp_hidden, cfg.moe_experts, cfg.moe_top_k, init_std=std,
                   out_std=out_std, tp=tp, activation=cfg.mlp_activation, normalize_top_k=cfg.moe_normalize_top_k,
                   capacity_factor=cfg.moe_capacity_factor, aux_loss_coef=cfg.moe_aux_loss_coef,
                   z_loss_coef=cfg.moe_z_loss_coef, sequence_parallel=tp.sequence_parallel,
                   shared_hidden=cfg.moe_shared_hidden)
    if symbol == "-":
        return GatedMLP(cfg.d_model, cfg.mlp_hidden, init_std=std, out_std=out_std,
                        sequence_parallel=tp.sequence_parallel, activation=cfg.mlp_activation, bias=cfg.linear_bias)
    raise ValueError(f"unknown layer symbol {symbol!r}")


class Sublayer(nn.Module):
    """``x + r * mixer(norm(x))`` on the residual stream ``[s(/tp), b, d]``; ``r = cfg.residual_multiplier``
    (1 but in Granite). ``injected`` (a Zamba shared block's output) is added to the mixer's input only:
    ``x + r * mixer(norm(x + injected))``."""

    def __init__(self, symbol: str, cfg: ModelConfig, tp: TPLayout):
        super().__init__()
        self.symbol = symbol
        self.sequence_parallel = tp.sequence_parallel
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, sequence_parallel=tp.sequence_parallel, offset=cfg.norm_offset)
        self.mixer = build_mixer(symbol, cfg, tp)
        self.residual_multiplier = cfg.residual_multiplier

    def _add(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return x + (out if self.residual_multiplier == 1.0 else out * self.residual_multiplier)

    def forward(self, x: torch.Tensor, docs=None, embeddings=None, injected=None) -> torch.Tensor:
        u = x if injected is None else x + injected
        return self._add(x, self.mixer(enter_tensor_parallel(self.norm(u), self.sequence_parallel), docs))

    def init_state(self, batch: int, max_len: int):
        return self.mixer.init_state(batch, max_len)

    def step(self, x: torch.Tensor, state, pos: int, embeddings=None, injected=None) -> torch.Tensor:
        u = x if injected is None else x + injected  # x: [1, b, d], no sequence sharding
        return self._add(x, self.mixer.step(enter_tensor_parallel(self.norm(u), False), state, pos))


class SharedUse(nn.Module):
    """One use of a shared block (symbols ``0``, ``1``): the block's parameters exist once, in the model's
    ``shared`` list, and every use runs those same tensors, so their gradients add up over the uses
    (Zamba's shared attention block). The block is held outside the module tree here, so its parameters
    have one name; each use keeps its own decoding state."""

    def __init__(self, block: nn.ModuleList, index: int):
        super().__init__()
        self.index = index
        self._block = (block,)  # a tuple: not registered as a child

    @property
    def block(self) -> nn.ModuleList:
        return self._block[0]

    def forward(self, x: torch.Tensor, docs=None, embeddings=None) -> torch.Tensor:
        for sublayer in self.block:
            x = sublayer(x, docs)
        return x

    def init_state(self, batch: int, max_len: int):
        return [sublayer.init_state(batch, max_len) for sublayer in self.block]

    def step(self, x: torch.Tensor, state, pos: int, embeddings=None) -> torch.Tensor:
        for sublayer, sub_state in zip(self.block, state):
            x = sublayer.step(x, sub_state, pos)
        return x
