"""Model FLOPs: what one token costs a model, added up from the count each sublayer kind declares beside its math.

Every sublayer kind states its forward FLOPs per token at sequence length ``s`` in its own file
(``SublayerSpec.flops_per_token(config, s) -> {term: FLOPs}``, each term named for the operation it counts);
a shared-block style states one use's (``SharedBlockStyle.flops_per_token``, else the block's sublayers'). This
module adds them up over the layer pattern, with the output head.

Conventions (those of the MFU literature: Kaplan et al. 2020, arXiv 2001.08361, Table 1; PaLM, arXiv 2204.02311,
App. B; Megatron-LM, arXiv 2104.04473, Sec. 5.1):

* a multiply-add is 2 FLOPs; a matrix product ``[m, k] x [k, n]`` is ``2 m k n``;
* counted: every matrix product (projections, scores, chunked scans' intra-chunk products, experts), and the
  sequence mixing that is not a matrix product — a scan's ``h = a h + b`` (2 per state element), a short or
  long convolution's taps, an FFT (``~2.5 n log2 n`` real FLOPs per transform of ``n`` points);
* not counted: pointwise work (nonlinearities, gates, norms, softmax, residual adds, RoPE): O(d) per token beside
  the O(d^2) of the projections;
* the embedding lookup is 0 FLOPs; the output head is ``2 d V``;
* causal attention counts the scores a query needs: ``(s + 1) / 2`` keys on average for global attention
  (a fused kernel skips the masked half), at most the window for local attention;
* MoE counts the experts a token visits (``top_k`` plus a shared expert), not all of them;
* **training = 3 x forward**: the backward pass is twice the forward (gradients with respect to the inputs and
  to the weights, each a product as large as the forward's). Recomputation under activation checkpointing is
  not counted (these are model FLOPs, not hardware FLOPs): MFU = model FLOPs per second / peak.

With these, a dense transformer without its attention scores costs ``6 N`` per trained token, ``N`` the
non-embedding parameters counted as Kaplan et al. do (the layers' matrices; biases and norm gains left out) plus
the output head's ``d V``, which is a matrix product over them (Kaplan et al. leave the de-embedding out of ``N``).
"""

from __future__ import annotations

from dataclasses import dataclass

from chimera.errors import UserError
from chimera.models.registry import SHARED_SYMBOLS, shared_styles, sublayers

TRAINING_MULTIPLIER = 3  # forward + backward (2 x forward)

Terms = dict[str, float]  # forward FLOPs per token, by the operation they count


@dataclass(frozen=True)
class Row:
    """One line of the breakdown: a sublayer (or a shared-block use, or the head) and its forward FLOPs per token."""

    unit: int | None  # the layer unit (``ModelConfig.layer_units``) it belongs to; None for the head
    symbol: str
    terms: Terms

    @property
    def total(self) -> float:
        return float(sum(self.terms.values()))


def sublayer_flops(cfg, symbol: str, seq_len: int, first_of_kind: bool = True) -> Terms:
    """Forward FLOPs per token of one sublayer of kind ``symbol``; ``first_of_kind`` adds what the first layer of
    a kind computes for all of them (``SublayerSpec.shared_flops_per_token``: GOLD's key cache)."""
    spec = sublayers()[symbol]
    if spec.flops_per_token is None:
        raise UserError(f"sublayer kind {symbol!r} ({spec.summary}) declares no flops_per_token in its SPECS: add "
                        "one beside its math (chimera.models.spec.SublayerSpec) to count its FLOPs")
    config = cfg.sublayer(symbol)
    terms = dict(spec.flops_per_token(config, seq_len))
    if first_of_kind and spec.shared_flops_per_token is not None:
        terms.update(spec.shared_flops_per_token(config, seq_len))
    return terms


def shared_use_flops(cfg, index: int, seq_len: int) -> Terms:
    """Forward FLOPs per token of one use of shared block ``index``: the style's own count, else (the residual
    style) its sublayers'."""
    style = shared_styles()[cfg.shared_block_style]
    if style.flops_per_token is not None:
        return dict(style.flops_per_token(cfg, index, seq_len))
    terms: Terms = {}
    for symbol in cfg.shared_blocks[index]:
        for name, value in sublayer_flops(cfg, symbol, seq_len).items():
            terms[f"{symbol} {name}"] = terms.get(f"{symbol} {name}", 0.0) + value
    return terms


def head_flops(cfg) -> Terms:
    """The logits: ``2 d V`` per token (the embedding lookup before the layers: 0)."""
    return {"logits": 2.0 * cfg.d_model * cfg.vocab_size}


def breakdown(cfg, seq_len: int) -> list[Row]:
    """Forward FLOPs per token of every sublayer of the pattern, in order, then the head."""
    if cfg.byte_latent is not None:
        raise UserError(f"model {cfg.name!r} is a byte-latent model (model.byte_latent): its FLOPs per byte depend on "
                        "the patches the entropy model cuts, which the FLOP model does not count")
    if seq_len < 1:
        raise UserError(f"sequence length {seq_len}: must be at least 1")
    rows, seen = [], set()
    for unit, symbols in enumerate(cfg.layer_units()):
        for symbol in symbols:
            if symbol in SHARED_SYMBOLS:
                rows.append(Row(unit, symbol, shared_use_flops(cfg, int(symbol), seq_len)))
            else:
                rows.append(Row(unit, symbol, sublayer_flops(cfg, symbol, seq_len, first_of_kind=symbol not in seen)))
                seen.add(symbol)
    rows.append(Row(None, "head", head_flops(cfg)))
    return rows


def unit_flops(cfg, seq_len: int) -> list[float]:
    """Forward FLOPs per token of each layer unit (pipeline stages are balanced by them)."""
    costs = [0.0] * len(cfg.layer_units())
    for row in breakdown(cfg, seq_len):
        if row.unit is not None:
            costs[row.unit] += row.total
    return costs


def forward_flops_per_token(cfg, seq_len: int) -> float:
    return sum(row.total for row in breakdown(cfg, seq_len))


def model_flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) of model ``cfg`` at sequence length ``seq_len``."""
    return TRAINING_MULTIPLIER * forward_flops_per_token(cfg, seq_len)


def kind_totals(cfg, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token by sublayer kind (and ``head``), summed over the pattern: the per-kind breakdown."""
    totals: dict[str, float] = {}
    for row in breakdown(cfg, seq_len):
        totals[row.symbol] = totals.get(row.symbol, 0.0) + TRAINING_MULTIPLIER * row.total
    return totals


def flops_columns(cfg, seq_len: int) -> str:
    """``chimera models --flops``: training FLOPs per token and GFLOPs per sequence, right-aligned (``-`` for a model
    the count does not cover)."""
    try:
        per_token = model_flops_per_token(cfg, seq_len)
    except UserError:
        return f" {'-':>12} {'-':>12}"
    return f" {per_token:>12.4g} {per_token * seq_len / 1e9:>12.4g}"
