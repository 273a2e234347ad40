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
o/down); the two norms and the use's linear are replicated and act on the residual stream, so under
sequence parallelism their gradients are partial (summed over TP), like every norm's. LoRA on the
shared k/v splits with the kv heads, so TP must divide ``num_kv_heads``. Context parallelism: the
block's attention needs every earlier key/value (that of ``*``); the fed sublayer, its own kind's.

The block reads the model's input embeddings from the ``Context`` every sublayer gets; the generic
LM knows nothing of the concat.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from chimera.models.channels.mlp import GatedMLP
from chimera.models.lora import LoRA
from chimera.models.mixers.attention import Attention, keys_seen, projection_flops, rope_of, score_flops
from chimera.models.norms import RMSNorm
from chimera.models.registry import SHARED_SYMBOLS
from chimera.models.spec import SharedBlockStyle, SublayerConfig, divisibility
from chimera.models.sublayer import Context, Sublayer
from chimera.parallel.dims import ParallelDims
from chimera.parallel.layers import enter_tensor_parallel
from chimera.parallel.sharding import declare, normal

BLOCK = "*-"  # the only block a Zamba-style use runs: attention, then the MLP


class ZambaStyleConfig(SublayerConfig):
    """The ``model:`` fields only Zamba-style shared blocks read."""

    shared_lora_rank: int | None = Field(
        None, ge=1, description="zamba style: rank of per-use LoRA adapters on the shared MLP's gate/up (Zamba2)"
    )
    shared_lora_attention: bool = Field(False, description="zamba style: per-use LoRA on the shared q, k, v too")
    num_kv_heads: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _resolve(self):
        if self.shared_lora_attention and not self.shared_lora_rank:
            raise ValueError("shared_lora_attention needs shared_lora_rank")
        return self


class SharedTransformer(nn.Module):
    """``(h, e) -> t``: ``[s(/tp), b, d]`` twice -> ``[s(/tp), b, d]``; the lines for ``u``, ``a``, ``t`` above."""

    ROW_POSITIONS = True  # step takes each row's position (chimera.models.positions)

    def __init__(self, cfg, dims: ParallelDims):
        super().__init__()
        d, sp = cfg.d_model, dims.sequence_parallel
        att, mlp = cfg.sublayer("*"), cfg.sublayer("-")
        self.dims = dims
        self.input_norm = RMSNorm(2 * d, cfg.norm_eps, sequence_parallel=sp, kernels=cfg.kernels)
        self.attention = Attention(d, att.num_heads, att.num_kv_heads, att.head_dim, window=None,
                                   rope=rope_of(att), init_std=cfg.init_std,
                                   out_std=cfg.init_std, dims=dims, scale=att.attention_scale, in_features=2 * d,
                                   kernels=cfg.kernels)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps, sequence_parallel=sp, kernels=cfg.kernels)
        self.mlp = GatedMLP(d, mlp.mlp_hidden, init_std=cfg.init_std, out_std=cfg.init_std, dims=dims,
                            activation=mlp.mlp_activation)

    def _input(self, h: torch.Tensor, embeddings: torch.Tensor, sequence_sharded: bool) -> torch.Tensor:
        return enter_tensor_parallel(self.input_norm(torch.cat([h, embeddings], dim=-1)), self.dims, sequence_sharded)

    def forward(self, h, embeddings, docs=None, adapters=None) -> torch.Tensor:
        sp = self.dims.sequence_parallel
        a = self.attention(self._input(h, embeddings, sp), docs, lora=_get(adapters, "attention"))
        return self.mlp(enter_tensor_parallel(self.mlp_norm(a), self.dims, sp), lora=_get(adapters, "mlp"))

    def step(self, h, embeddings, state, pos: int, adapters=None) -> torch.Tensor:  # [1, b, d]
        a = self.attention.step(self._input(h, embeddings, False), state, pos, lora=_get(adapters, "attention"))
        return self.mlp(enter_tensor_parallel(self.mlp_norm(a), self.dims, False), lora=_get(adapters, "mlp"))

    def prefill(self, h, embeddings, max_len: int, adapters=None):  # [s, b, d] -> (output, attention state)
        a, state = self.attention.prefill(self._input(h, embeddings, False), max_len, lora=_get(adapters, "attention"))
        return self.mlp(enter_tensor_parallel(self.mlp_norm(a), self.dims, False), lora=_get(adapters, "mlp")), state


def _get(adapters: nn.ModuleDict | None, name: str):
    return adapters[name] if adapters is not None and name in adapters else None


class ZambaUse(nn.Module):
    """One use of a shared transformer, fused with the sublayer it feeds: ``h -> h + f(norm(h + W_i t))``."""

    def __init__(self, block: SharedTransformer, index: int, feeds: Sublayer, cfg, dims: ParallelDims):
        super().__init__()
        d, style = cfg.d_model, cfg.style_config
        att, mlp = cfg.sublayer("*"), cfg.sublayer("-")
        self.index = index
        self._block = (block,)  # a tuple: not registered as a child (the block has one name, in CausalLM.shared)
        # [d, d]: replicated; under sequence parallelism its gradient is partial (summed over TP)
        self.linear = declare(nn.Parameter(torch.empty(d, d)), init=normal(cfg.init_std),
                              partial_grad_over_tp=dims.sequence_parallel)
        self.adapters = nn.ModuleDict()
        if style.shared_lora_rank:
            rank = style.shared_lora_rank
            self.adapters["mlp"] = LoRA(d, (mlp.mlp_hidden, mlp.mlp_hidden), rank, init_std=cfg.init_std, dims=dims)
            if style.shared_lora_attention:
                if not block.attention.kv_split:
                    raise ValueError(f"LoRA on the shared k/v needs TP={dims.tp} to divide num_kv_heads")
                q_out, kv_out = att.num_heads * att.head_dim, att.num_kv_heads * att.head_dim
                self.adapters["attention"] = nn.ModuleDict(
                    {name: LoRA(2 * d, (out,), rank, init_std=cfg.init_std, dims=dims)
                     for name, out in (("q", q_out), ("k", kv_out), ("v", kv_out))})
        self.sublayer = feeds

    @property
    def block(self) -> SharedTransformer:
        return self._block[0]

    def _injected(self, t: torch.Tensor) -> torch.Tensor:
        return torch.matmul(t, self.linear.t())

    def forward(self, x: torch.Tensor, context: Context) -> torch.Tensor:
        t = self.block(x, context.embeddings, context.docs, self.adapters)
        return self.sublayer(x, context, injected=self._injected(t))

    def init_state(self, batch: int, max_len: int):
        return {"attention": self.block.attention.init_state(batch, max_len),
                "sublayer": self.sublayer.init_state(batch, max_len)}

    def step(self, x: torch.Tensor, state, context: Context) -> torch.Tensor:
        t = self.block.step(x, context.embeddings, state["attention"], context.position, self.adapters)
        return self.sublayer.step(x, state["sublayer"], context, injected=self._injected(t))

    def prefill(self, x: torch.Tensor, context: Context, max_len: int):
        t, attention_state = self.block.prefill(x, context.embeddings, max_len, self.adapters)
        x, sublayer_state = self.sublayer.prefill(x, context, max_len, injected=self._injected(t))
        return x, {"attention": attention_state, "sublayer": sublayer_state}


def check(cfg) -> None:
    """A Zamba-style block is attention + MLP, and each use feeds the sublayer after its symbol."""
    if any(block != BLOCK for block in cfg.shared_blocks):
        raise ValueError(f"shared_block_style zamba runs an attention+MLP block: every entry of shared_blocks must "
                         f"be {BLOCK!r}, not {cfg.shared_blocks}")
    layers = cfg.staged_pattern  # with pipeline stage boundaries: a use and the sublayer it feeds stay together
    for i, symbol in enumerate(layers):
        if symbol in SHARED_SYMBOLS and (i + 1 == len(layers) or layers[i + 1] in SHARED_SYMBOLS + "|"):
            raise ValueError(f"shared_block_style zamba: shared symbol {symbol!r} at position {i} of "
                             f"{layers!r} must be followed by the sublayer it feeds (e.g. '0m'), in the same "
                             "pipeline stage")


def check_tensor_parallel(config: ZambaStyleConfig, tp: int) -> str | None:
    if config.shared_lora_attention:
        return divisibility(tp, {"model.num_kv_heads": config.num_kv_heads}, "which LoRA on the shared k/v needs")
    return None


def flops_per_token(cfg, index: int, seq_len: int) -> dict[str, float]:
    """One use (the fed sublayer counted as its own kind): attention over ``concat(h, e)`` (its projections from
    ``2 d``, its scores), the MLP, the use's linear ``W_i [d, d]`` and its LoRA adapters, 2 per weight."""
    d, style = cfg.d_model, cfg.style_config
    att, mlp = cfg.sublayer("*"), cfg.sublayer("-")
    terms = {"attention projections": projection_flops(att, in_features=2 * d),
             "attention scores": score_flops(att, keys_seen(seq_len, None)),
             "mlp": 2.0 * 3 * d * mlp.mlp_hidden, "use linear": 2.0 * d * d}
    rank = style.shared_lora_rank
    if rank:
        terms["mlp lora"] = 2.0 * (rank * d + 2 * mlp.mlp_hidden * rank)
        if style.shared_lora_attention:
            outputs = att.head_dim * (att.num_heads + 2 * att.num_kv_heads)
            terms["attention lora"] = 2.0 * (3 * rank * 2 * d + outputs * rank)
    return terms


STYLE = SharedBlockStyle(
    name="zamba",
    summary="the block ('*-') reads concat(h, token embeddings), has no residual of its own, and its output, "
            "through a per-use linear, is added to the input (not the residual) of the next sublayer",
    config=ZambaStyleConfig,
    build_block=lambda cfg, index, build: SharedTransformer(cfg, build.dims),
    build_use=lambda block, index, fed, cfg, build: ZambaUse(block, index, fed, cfg, build.dims),
    feeds_next=True,
    check=check,
    check_tensor_parallel=check_tensor_parallel,
    reads_embeddings=True,
    flops_per_token=flops_per_token,
)
