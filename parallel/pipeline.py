"""Pipeline parallelism: the layer stack cut into stages, and what crosses from one stage to the next.

**Where stages are cut.** ``|`` in the layer pattern marks the boundaries (Megatron-Core's hybrid-pattern
convention); without it, the cut balances cost: the contiguous split of the layer units
(``ModelConfig.layer_units``: a sublayer, or a shared-block use with the sublayer it feeds) that minimises
the most expensive stage. Cost is forward FLOPs per token, the model's FLOP count (``chimera.models.flops``:
what each sublayer kind declares, attention's scores, a MoE's top-k experts). The first stage also embeds (no
FLOPs), the last also computes logits (``2 d V``).

**What crosses a boundary** (``Carry``): a tuple of tensors, the form DeepSpeed's pipeline engine sends:

* the residual stream ``[s(/tp), b, d]``;
* the sum of the auxiliary losses of the stages so far (a scalar; MoE router losses), added to the loss on
  the last stage, so its gradient flows back through every stage like the stream's;
* the model's input embeddings, if its shared-block style reads them (Zamba: ``concat(h, embeddings)``);
* the whole sequences' ``segment_ids`` and ``position_ids`` ``[b, S]`` with ``packing: boundaries``.

**Stage modules.** ``InputStage`` (embedding), ``LayerStage`` (one layer unit of the model) and
``OutputStage`` (final norm and logits) each take and return a carry; ``pipeline_loss`` turns the last
stage's output and the labels into the rank's objective. They run the model's own pieces
(``CausalLM.input_stream``, its layers, ``logits_local``, ``language_model_loss``, ``objective``), so a
pipelined model computes what the whole model does in one process. Tied input/output embeddings and
shared blocks used on several stages exist once per stage holding them; the engine keeps those copies
equal by summing their gradients (``chimera.trainer.engine``).

With ``M`` micro-batches and ``P`` stages a 1F1B schedule idles each stage for ``P - 1`` of ``M + P - 1``
slots: ``bubble_fraction``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from chimera.models.flops import head_flops, unit_flops
from chimera.models.registry import SHARED_SYMBOLS

# ---- where the stages are cut ---------------------------------------------------------------------------


def balanced_split(costs: list[float], parts: int, last_extra: float = 0.0) -> list[tuple[int, int]]:
    """The contiguous split of ``costs`` into ``parts`` non-empty ranges minimising the largest range's cost (the
    last range also costs ``last_extra``); ranges as ``(start, stop)``."""
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot cut {n} layers into {parts} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[p][i]: the least possible largest cost of splitting the first i units into p ranges; cut: the last start
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for i in range(p, n - (parts - p) + 1):
            extra = last_extra if p == parts else 0.0
            for j in range(p - 1, i):
                worst = max(best[p - 1][j], prefix[i] - prefix[j] + extra)
                if worst < best[p][i]:
                    best[p][i], cut[p][i] = worst, j
    bounds, stop = [], n
    for p in range(parts, 0, -1):
        start = cut[p][stop]
        bounds.append((start, stop))
        stop = start
    return bounds[::-1]


def stage_bounds(cfg, stages: int, seq_len: int) -> list[tuple[int, int]]:
    """The layer units ``[start, stop)`` of each pipeline stage: as ``|`` marks them, else balanced by cost."""
    if cfg.stage_patterns is not None:
        bounds, start, count = [], 0, 0
        for unit in cfg.layer_units(staged=True):
            if unit == "|":
                bounds.append((start, count))
                start = count
            else:
                count += 1
        bounds.append((start, count))
        if len(bounds) != stages:
            raise ValueError(f"the pattern marks {len(bounds)} stages but the pipeline has {stages}")
        return bounds
    return balanced_split(unit_flops(cfg, seq_len), stages, sum(head_flops(cfg).values()))


def stage_parts(cfg, bounds: list[tuple[int, int]], stage: int) -> list[str]:
    """The submodules of the model (qualified names) that pipeline stage ``stage`` holds: the embedding (first
    stage, and the last when the head is tied to it), the shared blocks its layers use, its layers, the final norm
    and head (last stage)."""
    start, stop = bounds[stage]
    last = stage == len(bounds) - 1
    units = cfg.layer_units()[start:stop]
    parts = ["embed"] if stage == 0 or (last and cfg.tie_embeddings) else []
    parts += [f"shared.{b}" for b in sorted({u[0] for u in units if u[0] in SHARED_SYMBOLS})]
    parts += [f"layers.{i}" for i in range(start, stop)]
    if last:
        parts += ["final_norm"] + ([] if cfg.tie_embeddings else ["head"])
    return parts


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """The idle fraction of a 1F1B (or GPipe) schedule: ``(P - 1) / (M + P - 1)``."""
    return (stages - 1) / (micro_batches + stages - 1)


# ---- what crosses a stage boundary ------------------------------------------------------------------------


@dataclass(frozen=True)
class Carry:
    """The tuple a stage hands to the next: ``(stream, auxiliary_loss[, embeddings][, segment_ids, position_ids])``.
    """

    embeddings: bool  # the model reads its input embeddings in later sublayers
    documents: bool  # packed documents (segment and position ids of the whole sequences)

    def pack(self, x, auxiliary, embeddings=None, segment_ids=None, position_ids=None) -> tuple:
        out = (x, auxiliary)
        if self.embeddings:
            out += (embeddings,)
        if self.documents:
            out += (segment_ids, position_ids)
        return out

    def unpack(self, carried: tuple) -> tuple:
        """``(stream, auxiliary_loss, embeddings or None, segment_ids or None, position_ids or None)``."""
        x, auxiliary, rest = carried[0], carried[1], list(carried[2:])
        embeddings = rest.pop(0) if self.embeddings else None
        segment_ids, position_ids = (rest[0], rest[1]) if self.documents else (None, None)
        return x, auxiliary, embeddings, segment_ids, position_ids


def _context(model, embeddings, segment_ids, position_ids):
    from chimera.models.documents import PackedDocuments
    from chimera.models.sublayer import Context

    docs = None if segment_ids is None else PackedDocuments.from_batch(segment_ids, position_ids, model.dims)
    return Context(embeddings=embeddings, docs=docs)


def input_stage(model, carry: Carry):
    """The first stage's first function, ``(embedding module, inputs) -> carry``: ``inputs`` is
    ``(input_ids[, segment_ids, position_ids])`` of whole sequences ``[b, S]``."""
    def run(embedding: nn.Module, inputs) -> tuple:
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        x, context = model.input_stream(*inputs)
        # a leaf that requires grad: every float the stage sends must be part of its graph
        auxiliary = torch.zeros((), device=x.device, dtype=torch.float32, requires_grad=True)
        return carry.pack(x, auxiliary, context.embeddings, *inputs[1:])

    return run


class LayerStage(nn.Module):
    """One layer unit of the model on a carry; its auxiliary losses (training only) are added to the carried sum."""

    def __init__(self, model, index: int, carry: Carry):
        super().__init__()
        self.layer = model.layers[index]
        self._model = (model,)  # the model's pieces, not registered as a child (it holds every stage's layers)
        self.carry = carry

    def forward(self, carried: tuple) -> tuple:
        model = self._model[0]
        x, auxiliary, embeddings, segment_ids, position_ids = self.carry.unpack(carried)
        x = model.run_layers(x, _context(model, embeddings, segment_ids, position_ids), [self.layer])
        if self.training:
            mine = model.auxiliary_loss([self.layer])
            auxiliary = auxiliary if mine is None else auxiliary + mine
        return self.carry.pack(x, auxiliary, embeddings, segment_ids, position_ids)


class OutputStage(nn.Module):
    """The final norm and the logits: carry -> ``(this rank's vocabulary shard of the logits [s, b, V / tp],
    auxiliary_loss)``. Holds the output head (when untied); a tied head is the input embedding, which the
    engine holds on this stage too."""

    def __init__(self, model, carry: Carry):
        super().__init__()
        self.final_norm, self.head = model.final_norm, model.head
        self._model = (model,)
        self.carry = carry

    def forward(self, carried: tuple) -> tuple:
        model = self._model[0]
        x, auxiliary, *_ = self.carry.unpack(carried)
        return model.logits_local(x), auxiliary


def pipeline_loss(model, output: OutputStage):
    """``loss_fn(outputs, labels)`` of the last stage: the rank's objective, as ``CausalLM.forward`` computes it
    (auxiliary losses in training only)."""
    def loss(outputs: tuple, labels: torch.Tensor) -> torch.Tensor:
        logits, auxiliary = outputs
        shares = model.language_model_loss(logits, labels, model.label_smoothing if output.training else 0.0)
        if output.training:
            shares = shares + auxiliary
        return model.objective(shares)

    return loss
