"""A causal language model built from a layer pattern: embedding -> sublayers -> final norm -> head.

``forward(input_ids)`` gives logits ``[b, s, vocab]``; ``forward(input_ids, labels)`` gives the mean
next-token loss (vocab-parallel cross entropy, positions with label ``IGNORE_INDEX`` ignored) plus,
in training, the auxiliary losses of whichever sublayers produce one. Decoding: ``init_state`` then
``step`` one token at a time with each mixer's cached state; ``prefill`` runs a whole prompt in one parallel pass and
returns that state as the steps would have left it.

The model knows no architecture: each symbol's sublayer comes from the registry, shared blocks from
their style, the scalars of particular released models from ``cfg.numerics``. It is built for the
``ParallelDims`` it is given (``ParallelDims()``: one process, no process group needed);
``build_model`` builds it on the meta device and materialises only this rank's shards from the
layout-free initialisation.

Inside, the residual stream is ``[s, b, d]`` (``[s / tp, b, d]`` under sequence parallelism); the
conversion from and to batch-first happens only here.

Context parallelism: the model takes whole sequences and keeps its rank's chunk (``input_stream``); the
loss it returns is its rank's objective, whose mean over the context-parallel ranks is the sequence's
mean loss (the rank's share of the summed token losses over the whole sequence's token count, times
the context-parallel size), so that averaging gradients over data x context ranks gives the gradient of
the batch's loss. Without labels it returns its chunk's logits.

The pieces ``input_stream``, ``run_layers``, ``logits_local``, ``language_model_loss``,
``auxiliary_loss`` and ``objective`` are what a pipeline stage runs a part of
(``chimera.parallel.pipeline``); ``forward`` is all of them in one process.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from chimera.data import IGNORE_INDEX
from chimera.models.batch_state import put_rows, state_layout, take_rows
from chimera.models.config import ModelConfig
from chimera.models.documents import PackedDocuments
from chimera.models.norms import build_norm
from chimera.models.registry import SHARED_SYMBOLS
from chimera.models.spec import Build
from chimera.models.sublayer import Context, Sublayer
from chimera.parallel.context import local_chunk, sum_over_context
from chimera.parallel.dims import SINGLE_PROCESS, ParallelDims
from chimera.parallel.layers import (
    ColumnParallel,
    VocabParallelEmbedding,
    enter_tensor_parallel,
    gather_vocab,
    register_partial_grad_hooks,
    scatter_sequence,
    vocab_parallel_cross_entropy,
)
from chimera.parallel.sharding import (
    fill_shards,
    full_shape,
    held,
    initialize_parameters,
    load_full_state_dict,
    normal,
)


def build_layers(cfg: ModelConfig, build: Build, shared: nn.ModuleList) -> list[nn.Module]:
    """One module per unit of the pattern (``ModelConfig.layer_units``): a sublayer, or a use of a shared block of
    ``shared`` (fused with the sublayer after it when its style feeds that one)."""
    layers, seen = [], set()
    for index, unit in enumerate(cfg.layer_units()):
        at = dataclasses.replace(build, layer=index)
        if unit[0] not in SHARED_SYMBOLS:
            layers.append(Sublayer(unit, cfg, dataclasses.replace(at, first_of_kind=unit not in seen)))
            seen.add(unit)
            continue
        fed = Sublayer(unit[1], cfg, at) if len(unit) > 1 else None
        layers.append(cfg.style.build_use(shared[int(unit[0])], int(unit[0]), fed, cfg, build))
    return layers


def reporting_modules(root: nn.Module, modules=None) -> list[tuple[str, nn.Module]]:
    """The sublayers (of ``modules``, default: ``root``) that report an auxiliary loss or metrics
    (``auxiliary_loss()``, ``metrics()``)."""
    roots = [root] if modules is None else modules
    return [(name, m) for r in roots for name, m in r.named_modules()
            if m is not root and (hasattr(m, "auxiliary_loss") or hasattr(m, "metrics"))]


def summed_auxiliary_loss(root: nn.Module, modules=None) -> torch.Tensor | None:
    """The sum of the auxiliary losses of the last forward pass of the reporting sublayers; None if none has one."""
    found = [a for _, m in reporting_modules(root, modules)
             if hasattr(m, "auxiliary_loss") and (a := m.auxiliary_loss()) is not None]
    return sum(found[1:], found[0]) if found else None


def reported_metrics(root: nn.Module) -> dict:
    """Each reporting sublayer's ``metrics()`` of the last forward pass, under ``<its metrics_group>/<its
    name>/<metric>`` (e.g. ``moe/layers.3/expert_load``)."""
    out = {}
    for name, module in reporting_modules(root):
        if hasattr(module, "metrics"):
            prefix = f"{getattr(module, 'metrics_group', 'layer')}/{name.removesuffix('.mixer')}"
            out.update({f"{prefix}/{k}": v for k, v in module.metrics().items()})
    return out


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dims: ParallelDims = SINGLE_PROCESS):
        super().__init__()
        self.cfg, self.dims = cfg, dims
        self.numerics = cfg.numerics
        build = Build.of(cfg, dims)
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, dims, init=normal(cfg.init_std))
        self.shared = nn.ModuleList(cfg.style.build_block(cfg, i, build) for i in range(len(cfg.shared_blocks)))
        # RWKV's ln0: on the embeddings, before the residual stream is split along the sequence
        self.embed_norm = (build_norm(cfg.numerics, cfg.d_model, cfg.norm_eps, kernels=cfg.kernels)
                           if cfg.numerics.embedding_norm else None)
        self.layers = nn.ModuleList(build_layers(cfg, build, self.shared))
        self.final_norm = build_norm(cfg.numerics, cfg.d_model, cfg.norm_eps, sequence_parallel=dims.sequence_parallel,
                                      kernels=cfg.kernels)
        self.head = None if cfg.tie_embeddings else ColumnParallel(cfg.d_model, cfg.vocab_size, dims,
                                                                   init=normal(cfg.init_std))
        self.activation_checkpointing = False
        self.label_smoothing = 0.0  # of the training loss (the trainer sets it); validation is never smoothed

    def input_stream(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, Context]:
        """Whole sequences ``[b, S]`` -> this rank's residual stream ``[s(/tp), b, d]`` (its context-parallel chunk,
        its sequence-parallel shard of that) and the context every sublayer of the pass reads."""
        docs = None if segment_ids is None else PackedDocuments.from_batch(segment_ids, position_ids, self.dims)
        x = self.embed_tokens(local_chunk(input_ids, self.dims, 1).t())  # [s, b, d]
        if self.dims.sequence_parallel:
            x = scatter_sequence(x, self.dims)
        return x, Context(embeddings=x, docs=docs, tokens=input_ids, embed=self.embed_tokens)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[s, b]`` -> the model's input ``[s, b, d]``: embedding, numerics, embedding norm."""
        x = self.numerics.embed(self.embed(ids.contiguous()))
        return x if self.embed_norm is None else self.embed_norm(x)

    def run_layers(self, x: torch.Tensor, context: Context, layers=None) -> torch.Tensor:
        """``layers`` (default: all) in turn on the residual stream; recomputed in backward with activation
        checkpointing."""
        for layer in self.layers if layers is None else layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, context, use_reentrant=False)
            else:
                x = layer(x, context)
        return x

    def logits_local(self, h: torch.Tensor, sequence_sharded: bool | None = None) -> torch.Tensor:
        """``[s(/tp), b, d]`` -> this rank's vocabulary shard of the logits ``[s, b, V / tp]``."""
        sharded = self.dims.sequence_parallel if sequence_sharded is None else sequence_sharded
        h = enter_tensor_parallel(self.final_norm(h), self.dims, sharded)
        logits = torch.matmul(h, self.embed.weight.t()) if self.head is None else self.head(h)
        return self.numerics.logits(logits)

    def language_model_loss(self, logits_local: torch.Tensor, labels: torch.Tensor,
                            label_smoothing: float = 0.0) -> torch.Tensor:
        """This rank's share of the mean next-token loss of whole-sequence ``labels [b, S]`` (positions labelled
        ``IGNORE_INDEX`` left out): its chunk's summed losses over the whole sequence's count; with
        ``label_smoothing`` each token's loss is the smoothed cross entropy (``vocab_parallel_cross_entropy``)."""
        targets = local_chunk(labels, self.dims, 1).transpose(0, 1).contiguous()
        mask = targets != IGNORE_INDEX
        losses = vocab_parallel_cross_entropy(logits_local, torch.where(mask, targets, 0), self.dims, label_smoothing)
        return (losses * mask).sum() / sum_over_context(mask.sum(), self.dims).clamp(min=1)

    def auxiliary_loss(self, modules=None) -> torch.Tensor | None:
        """The sum of the auxiliary losses of the last forward pass of the sublayers in ``modules`` (default: the
        whole model) that produce one, e.g. a MoE router's; None if none does."""
        return summed_auxiliary_loss(self, modules)

    def objective(self, shares: torch.Tensor) -> torch.Tensor:
        """This rank's loss from its shares of the sequence's losses: their sum times the context-parallel size, so
        that its mean over the context-parallel ranks is the sequence's loss."""
        return shares * self.dims.cp

    @property
    def features_width(self) -> int:
        """The width of ``features``' vectors."""
        return self.cfg.d_model

    def features(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final norm's output, one vector per input token, ``[b, s, d]``: what task heads read (one process,
        nothing split; ``chimera finetune``)."""
        x, context = self.input_stream(input_ids, segment_ids, position_ids)
        return self.final_norm(self.run_layers(x, context)).transpose(0, 1)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``segment_ids`` / ``position_ids`` ``[b, s]`` (optional): several documents packed per sequence,
        kept apart (see ``chimera.models.documents``)."""
        x, context = self.input_stream(input_ids, segment_ids, position_ids)
        logits = self.logits_local(self.run_layers(x, context))  # [s, b, V / tp]
        if labels is None:
            return gather_vocab(logits, self.dims).transpose(0, 1)  # [b, s, V] (this rank's chunk)
        loss = self.language_model_loss(logits, labels, self.label_smoothing if self.training else 0.0)
        if self.training:  # auxiliary losses train (e.g. a router); validation reports the language-model loss alone
            auxiliary = self.auxiliary_loss()
            loss = loss if auxiliary is None else loss + auxiliary
        return self.objective(loss)

    def training_metrics(self) -> dict:
        """What the last forward pass reports beyond the loss: each reporting sublayer's ``metrics()``, under
        ``<its metrics_group>/<its layer>/<name>`` (e.g. ``moe/layers.3/expert_load``)."""
        return reported_metrics(self)

    # ---- decoding -----------------------------------------------------------------------------

    def init_state(self, batch: int, max_len: int) -> list:
        return [layer.init_state(batch, max_len) for layer in self.layers]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, max_len: int) -> tuple[torch.Tensor, list]:
        """A prompt ``[b, t]`` in one parallel pass -> (logits ``[b, t, V]``, the decoding state ``init_state(b,
        max_len)`` and ``t`` steps would leave); decoding goes on with ``step(next_token, state, pos=t)``."""
        if self.dims.cp > 1 or self.dims.sequence_parallel:
            raise ValueError("prefill runs whole prompts on one rank: no context or sequence parallelism")
        x = self.embed_tokens(input_ids.t())  # [t, b, d]
        context = Context(embeddings=x, tokens=input_ids, embed=self.embed_tokens)
        state = []
        for layer in self.layers:
            x, layer_state = layer.prefill(x, context, max_len)
            state.append(layer_state)
        return gather_vocab(self.logits_local(x, False), self.dims).transpose(0, 1), state

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: list, pos: int | torch.Tensor) -> torch.Tensor:
        """One token per sequence ``[b]`` at position ``pos`` -> logits ``[b, V]``; updates ``state``. ``pos``: one
        position for the batch, or each row's own (``LongTensor [b]``: prompts of different lengths, sequences that
        joined a running batch). Rows at different positions step together where every mixer takes per-row
        positions (``ROW_POSITIONS``); otherwise each group of rows at one position steps apart."""
        if isinstance(pos, torch.Tensor) and not self.steps_rows_together():
            return step_rows_apart(self, tokens, state, pos)
        x = self.embed_tokens(tokens[None, :])  # [1, b, d]
        context = Context(embeddings=x, position=pos, tokens=tokens, embed=self.embed_tokens)
        for layer, layer_state in zip(self.layers, state):
            x = layer.step(x, layer_state, context)
        return gather_vocab(self.logits_local(x, False), self.dims)[0]

    def steps_rows_together(self) -> bool:
        """Whether every module whose ``step`` reads the position takes each row's own (``ROW_POSITIONS``)."""
        if not hasattr(self, "_rows_together"):
            readers = [m for m in self.modules() if m is not self and "pos" in _step_parameters(type(m))]
            object.__setattr__(self, "_rows_together", all(getattr(m, "ROW_POSITIONS", False) for m in readers))
        return self._rows_together

    # ---- size ---------------------------------------------------------------------------------

    def full_shapes(self) -> dict[str, torch.Size]:
        """Every parameter's full shape (all TP shards together)."""
        return {n: full_shape(p, self.dims) for n, p in self.named_parameters()}

    def num_parameters(self) -> int:
        """Parameters of the whole model (all TP shards)."""
        return sum(s.numel() for s in self.full_shapes().values())


def _step_parameters(cls) -> tuple[str, ...]:
    """The parameter names of ``cls.step`` (none if it has no ``step``)."""
    step = getattr(cls, "step", None)
    return tuple(inspect.signature(step).parameters) if callable(step) else ()


def step_rows_apart(model: nn.Module, tokens: torch.Tensor, state: list, pos: torch.Tensor) -> torch.Tensor:
    """``model.step`` with row ``i`` at ``pos[i]``, one step per group of rows at one position (their rows taken out
    of the state, stepped, and put back)."""
    values = pos.unique()
    if len(values) == 1:
        return model.step(tokens, state, int(values[0]))
    layout = state_layout(model)
    logits = None
    for value in values:
        rows = (pos == value).nonzero()[:, 0]
        part = take_rows(state, layout, rows)
        out = model.step(tokens[rows], part, int(value))
        put_rows(state, layout, rows, part)
        logits = out.new_empty(len(pos), *out.shape[1:]) if logits is None else logits
        logits[rows] = out
    return logits


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    """The module a model config builds: a byte-latent model when it has a ``byte_latent:`` section
    (``chimera.models.byte_latent``), else the causal LM of its layer pattern."""
    if cfg.byte_latent is not None:
        from chimera.models.byte_latent import ByteLatentLM

        return ByteLatentLM
    return CausalLM


def build_model(cfg: ModelConfig, dims: ParallelDims = SINGLE_PROCESS, *, seed: int, device=None,
                weights=None, parts: list[str] | None = None, each_part=None) -> nn.Module:
    """The model for ``dims``, built on the meta device; then only this rank's shards are materialised (on
    ``device``), each drawn from the layout-free init of (``seed``, parameter name), or from ``weights``: full
    tensors by name, or a function ``(name, parameter) -> this rank's shard`` (e.g. read from a checkpoint).
    ``parts``: the submodules to materialise (a pipeline stage's; default all), the rest stays on the meta device.
    ``each_part(module)``: called on each top-level submodule as soon as it is materialised (ZeRO-3 partitions it
    there, so that no more than one submodule is ever whole in memory). Gradients declared partial over TP are
    summed as they are produced."""
    with torch.device("meta"):
        model = model_class(cfg)(cfg, dims)
    wanted = held([name for name, _ in model.named_parameters()], parts)
    top = [name for name, child in model.named_children() for name in (
        [f"{name}.{i}" for i in range(len(child))] if isinstance(child, nn.ModuleList) else [name])]
    groups = [p for p in top if any(w.startswith(p + ".") for w in wanted)] if each_part else [parts]
    for group in groups:
        chosen = group if group is None or isinstance(group, list) else [group]
        if weights is None:
            initialize_parameters(model, seed, dims, device, chosen)
        elif callable(weights):
            fill_shards(model, dims, weights, device, chosen)
        else:
            load_full_state_dict(model, weights, dims, device, chosen)
        if device is not None:
            for part in chosen or [""]:
                model.get_submodule(part).to(device)  # the index buffers, built on the CPU
        if each_part is not None:
            each_part(model.get_submodule(group))
    register_partial_grad_hooks(model, dims)
    return model


def meta_model(cfg: ModelConfig, dims: ParallelDims = SINGLE_PROCESS) -> nn.Module:
    """The model without weights (meta device): names, shapes and counts, at no memory cost."""
    with torch.device("meta"):
        return model_class(cfg)(cfg, dims)
