"""A causal language model built from a layer pattern: embedding -> sublayers -> final norm -> head.

``forward(input_ids)`` gives logits ``[b, s, vocab]``; ``forward(input_ids, labels)`` gives the mean
next-token loss (vocab-parallel cross entropy, positions with label ``-100`` ignored). Decoding:
``init_state`` then ``step`` one token at a time with each mixer's cached state.

Inside, the residual stream is ``[s, b, d]`` (``[s / tp, b, d]`` under sequence parallelism); the
conversion from and to batch-first happens only here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from chimera.configs.schema import SHARED_SYMBOLS, ModelConfig
from chimera.models.blocks import SharedUse, Sublayer
from chimera.models.documents import PackedDocuments
from chimera.models.moe import MoE
from chimera.models.norms import RMSNorm
from chimera.models.shared_transformer import SharedTransformer, ZambaUse
from chimera.parallel.layers import (
    ColumnParallel,
    TPLayout,
    VocabParallelEmbedding,
    enter_tensor_parallel,
    gather_vocab,
    register_partial_grad_hooks,
    scatter_sequence,
    vocab_parallel_cross_entropy,
)
from chimera.parallel.sharding import full_shape, normal

IGNORE_INDEX = -100


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPLayout | None = None):
        super().__init__()
        tp = tp or TPLayout.current()
        self.cfg, self.tp = cfg, tp
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, init=normal(cfg.init_std))
        if cfg.shared_block_style == "zamba":
            self.shared = nn.ModuleList(SharedTransformer(cfg, tp) for _ in cfg.shared_blocks)
        else:
            self.shared = nn.ModuleList(nn.ModuleList(Sublayer(symbol, cfg, tp) for symbol in block)
                                        for block in cfg.shared_blocks)
        self.layers = nn.ModuleList(self._build_layers(cfg, tp))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, sequence_parallel=tp.sequence_parallel,
                                  offset=cfg.norm_offset)
        # RecurrentGemma multiplies embeddings by sqrt(d) as a bf16 constant; the rounding is part of the model
        self.embed_scale = float(torch.tensor(cfg.d_model**0.5, dtype=torch.bfloat16, device="cpu")) \
            if cfg.scale_embeddings else None
        self.head = None if cfg.tie_embeddings else ColumnParallel(cfg.d_model, cfg.vocab_size,
                                                                   init=normal(cfg.init_std))
        self.activation_checkpointing = False
        register_partial_grad_hooks(self)

    def _build_layers(self, cfg: ModelConfig, tp: TPLayout) -> list[nn.Module]:
        """One module per sublayer; a Zamba-style shared symbol and the sublayer it feeds make one module."""
        layers, symbols = [], iter(cfg.layers)
        for symbol in symbols:
            if symbol not in SHARED_SYMBOLS:
                layers.append(Sublayer(symbol, cfg, tp))
            elif cfg.shared_block_style == "zamba":
                block = self.shared[int(symbol)]
                layers.append(ZambaUse(block, int(symbol), Sublayer(next(symbols), cfg, tp), cfg, tp))
            else:
                layers.append(SharedUse(self.shared[int(symbol)], int(symbol)))
        return layers

    def _logits_local(self, h: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
        """``[s(/tp), b, d]`` -> this rank's vocabulary shard of the logits ``[s, b, V / tp]``."""
        h = enter_tensor_parallel(self.final_norm(h), sequence_parallel)
        logits = torch.matmul(h, self.embed.weight.t()) if self.head is None else self.head(h)
        if self.cfg.logits_divisor != 1.0:  # Granite's logits_scaling: a division, as there
            logits = logits / self.cfg.logits_divisor
        cap = self.cfg.logits_soft_cap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        if self.cfg.embedding_multiplier != 1.0:  # Granite
            x = x * self.cfg.embedding_multiplier
        return x if self.embed_scale is None else x * self.embed_scale

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``segment_ids`` / ``position_ids`` ``[b, s]`` (optional): several documents packed per sequence,
        kept apart (see ``chimera.models.documents``)."""
        docs = None if segment_ids is None else PackedDocuments.from_batch(segment_ids, position_ids)
        x = self._embed(input_ids).transpose(0, 1).contiguous()  # [b, s, d] -> [s, b, d]
        if self.tp.sequence_parallel:
            x = scatter_sequence(x)
        embeddings = x  # Zamba's shared blocks read them again
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, docs, embeddings, use_reentrant=False)
            else:
                x = layer(x, docs, embeddings)
        logits = self._logits_local(x, self.tp.sequence_parallel)  # [s, b, V / tp]
        if labels is None:
            return gather_vocab(logits).transpose(0, 1)  # [b, s, V]
        targets = labels.transpose(0, 1).contiguous()
        mask = targets != IGNORE_INDEX
        losses = vocab_parallel_cross_entropy(logits, torch.where(mask, targets, 0))
        loss = (losses * mask).sum() / mask.sum().clamp(min=1)
        if self.training:  # router losses train the router; validation reports the language-model loss alone
            loss = loss + sum((m.last_aux_loss for m in self._moe_layers()), torch.zeros((), device=loss.device))
        return loss

    def _moe_layers(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def training_metrics(self) -> dict:
        """What the last forward pass reports beyond the loss: each MoE layer's router losses and expert load."""
        out = {}
        for name, module in self.named_modules():
            if isinstance(module, MoE):
                layer = name.removesuffix(".mixer")
                out.update({f"moe/{layer}/{k}": v for k, v in module.last_stats.items()})
                out[f"moe/{layer}/expert_load"] = [round(float(x), 5) for x in module.last_load]
        return out

    # ---- decoding -----------------------------------------------------------------------------

    def init_state(self, batch: int, max_len: int) -> list:
        return [layer.init_state(batch, max_len) for layer in self.layers]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: list, pos: int) -> torch.Tensor:
        """One token per sequence ``[b]`` at position ``pos`` -> logits ``[b, V]``; updates ``state``."""
        x = embeddings = self._embed(tokens[None, :])  # [1, b, d]
        for layer, layer_state in zip(self.layers, state):
            x = layer.step(x, layer_state, pos, embeddings)
        return gather_vocab(self._logits_local(x, False))[0]

    def num_parameters(self) -> int:
        """Parameters of the whole model (all TP shards)."""
        return sum(full_shape(p, self.tp.size).numel() for p in self.parameters())
