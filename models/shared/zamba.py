"""Zamba's shared transformer block and its uses (Glorioso et al., arXiv 2405.16712, Sec. 3 and Fig. 2;
Zamba2: arXiv 2411.15242). ``shared_block_style: zamba``; the block's pattern is ``*-``.

One attention + MLP block, its parameters held once, runs at several depths. At use ``i`` (symbol
``0`` or ``1`` in the pattern, followed by the sublayer ``f`` it feeds), with ``h`` the residual
stream and ``e`` the token embeddings (the model's input)::

    u   = RMSNorm_2d(concat(h, e))                       # [..., 2 d]
    a   = W_o Attn(W_q u, W_k u, W_v u)                  # heads of head_dim over a 2d input -> [..., d]
    t   = MLP(RMSNorm_d(a))                              # gated MLP (exact GeLU in Zamba); no residual inside
    h' = h + f(RMSNorm(h + W_i t))                       # W_i: the use's own [d, d] linear (Eq. 6);
                                                         # t enters f's input, not the residual
Zamba2 adds per-use LoRA adapters (``chimera.models.lora``): on the MLP's gate/up projections
(``shared_lora_rank``) and optionally on q, k, v (``shared_lora_attention``); two blocks alternate
(``0`` and ``1``). Attention scale and RoPE are the model's (Zamba: ``(head_dim / 2)^-1/2``, no RoPE).

Sharing: the block lives once in ``CausalLM.shared``; each ``ZambaUse`` holds it outside its module
tree (one name per tensor), and the use's own linear, adapters and the fed sublayer inside it, so the
block's gradient is the sum over uses. Each use keeps its own key/value cache.

TP and SP: the block is an ordinary sublayer pair (column-parallel q/k/v and gate/up, row-parallel
o/down); the two norms and the use's linear are replicated and act on the residual layout, so under
sequence parallelism their gradients are partial (summed over TP), like every norm's.
"""

from __future__ import annotations

import torch
from torch import nn

from chimera.configs.schema import ModelConfig
from chimera.models.blocks import Sublayer
from chimera.models.lora import LoRA
from chimera.models.mixers.attention import Attention
from chimera.models.mlp import GatedMLP
from chimera.models.norms import RMSNorm
from chimera.parallel.layers import TPLayout, enter_tensor_parallel
from chimera.parallel.sharding import declare, normal


class SharedTransformer(nn.Module):
    """``(h, e) -> t``: ``[s(/tp), b, d]`` twice -> ``[s(/tp), b, d]``; the lines for ``u``, ``a``, ``t`` above."""

    def __init__(self, cfg: ModelConfig, tp: TPLayout):
        super().__init__()
        d, sp = cfg.d_model, tp.sequence_parallel
        self.sequence_parallel = sp
        self.input_norm = RMSNorm(2 * d, cfg.norm_eps, sequence_parallel=sp)
        self.attention = Attention(d, cfg.num_heads, cfg.num_kv_heads, cfg.head_size, window=None,
                                   rope_base=cfg.rope_base, rope_fraction=cfg.rope_fraction, init_std=cfg.init_std,
                                   out_std=cfg.init_std, tp=tp, scale=cfg.attention_scale, in_features=2 * d)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps, sequence_parallel=sp)
        self.mlp = GatedMLP(d, cfg.mlp_hidden, init_std=cfg.init_std, out_std=cfg.init_std, sequence_parallel=sp,
                            activation=cfg.mlp_activation)

    def _input(self, h: torch.Tensor, embeddings: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
        return enter_tensor_parallel(self.input_norm(torch.cat([h, embeddings], dim=-1)), sequence_parallel)

    def forward(self, h, embeddings, docs=None, adapters=None) -> torch.Tensor:
        a = self.attention(self._input(h, embeddings, self.sequence_parallel), docs, lora=_get(adapters, "attention"))
        return self.mlp(enter_tensor_parallel(self.mlp_norm(a), self.sequence_parallel), lora=_get(adapters, "mlp"))

    def step(self, h, embeddings, state, pos: int, adapters=None) -> torch.Tensor:  # [1, b, d]
        a = self.attention.step(self._input(h, embeddings, False), state, pos, lora=_get(adapters, "attention"))
        return self.mlp(enter_tensor_parallel(self.mlp_norm(a), False), lora=_get(adapters, "mlp"))


def _get(adapters: nn.ModuleDict | None, name: str):
    return adapters[name] if adapters is not None and name in adapters else None


class ZambaUse(nn.Module):
    """One use of a shared transformer, fused with the sublayer it feeds: ``h -> h + f(norm(h + W_i t))``."""

    def __init__(self, block: SharedTransformer, index: int, feeds: Sublayer, cfg: ModelConfig, tp: TPLayout):
        super().__init__()
        d = cfg.d_model
        self.index = index
        self._block = (block,)  # a tuple: not registered as a child (the block has one name, in CausalLM.shared)
        # [d, d]: replicated; under sequence parallelism its gradient is partial (summed over TP)
        self.linear = declare(nn.Parameter(torch.empty(d, d)), init=normal(cfg.init_std),
                              partial_grad_over_tp=tp.sequence_parallel)
        self.adapters = nn.ModuleDict()
        if cfg.shared_lora_rank:
            rank = cfg.shared_lora_rank
            self.adapters["mlp"] = LoRA(d, (cfg.mlp_hidden, cfg.mlp_hidden), rank, init_std=cfg.init_std, tp=tp)
            if cfg.shared_lora_attention:
                if not block.attention.kv_split:
                    raise ValueError(f"LoRA on the shared k/v needs TP={tp.size} to divide num_kv_heads")
                q_out, kv_out = cfg.num_heads * cfg.head_size, cfg.num_kv_heads * cfg.head_size
                self.adapters["attention"] = nn.ModuleDict(
                    {name: LoRA(2 * d, (out,), rank, init_std=cfg.init_std, tp=tp)
                     for name, out in (("q", q_out), ("k", kv_out), ("v", kv_out))})
        self.sublayer = feeds

    @property
    def block(self) -> SharedTransformer:
        return self._block[0]

    def _injected(self, t: torch.Tensor) -> torch.Tensor:
        return torch.matmul(t, self.linear.t())

    def forward(self, x: torch.Tensor, docs=None, embeddings=None) -> torch.Tensor:
        t = self.block(x, embeddings, docs, self.adapters)
        return self.sublayer(x, docs, injected=self._injected(t))

    def init_state(self, batch: int, max_len: int):
        return {"attention": self.block.attention.init_state(batch, max_len),
                "sublayer": self.sublayer.init_state(batch, max_len)}

    def step(self, x: torch.Tensor, state, pos: int, embeddings=None) -> torch.Tensor:
        t = self.block.step(x, embeddings, state["attention"], pos, self.adapters)
        return self.sublayer.step(x, state["sublayer"], pos, injected=self._injected(t))
