"""The routed hybrid (DynamicHybridModel): a router sends each token to a Mamba-2 path or an attention path.

Symbol ``Y`` (a fork). One block holds a Mamba-2 mixer (``chimera.models.mixers.mamba2``) and a global attention
mixer (``chimera.models.mixers.attention``), unchanged, and a router over the normed input ``h_t``::

    p_t      = softmax(W_r h_t + b_r)                  # [2]: p_t[0] the SSM path, p_t[1] attention
    first_t  = argmax_j p_t[j]                         # the token's first choice

Causal capacity. Mixture-of-depths takes the top-k tokens of the whole sequence, which lets a later token
change whether an earlier one is processed (not causal). Here a path ``j`` with capacity fraction ``c_j`` may
hold, among the first ``n`` tokens of a sequence, at most ``K_j(n) = floor(c_j n)`` tokens, and admits tokens
first come, first served. With ``A_j(t)`` the tokens admitted to ``j`` before position ``t``::

    path_t = first_t         if A_first(t) < K_first(t + 1)
           = other_t         if overflow is "other" and A_other(t) < K_other(t + 1)
           = residual        otherwise (the block adds nothing at t)
    A_j(t + 1) = A_j(t) + [path_t = j]

so ``A_j(n) <= K_j(n)`` at every prefix ``n`` (capacity respected exactly, at each prefix and over the whole
sequence), and ``path_t`` depends on tokens ``<= t`` only: decoding routes by the same rule and equals the
forward pass. The rule is one small integer recurrence over positions on ``[b]`` tensors (``admit``), shared by
``forward`` and ``step``; the paths' math stays vectorised. Capacity counts per sequence of the batch (packed
documents share their sequence's budget).

Each path runs on its routed tokens only: per sequence, the routed tokens compacted in order (a subsequence of
length ``L = max_b |routed_b|``, padded at the end, the padding masked out), with their documents' segment ids and
in-document positions, so attention sees only earlier routed tokens of its document and the SSM's state runs over
routed tokens and is reset at document starts. The chosen path's output is scaled by its probability
(differentiable, trains the router)::

    y_t = p_t[path_t] * f_path_t(h_routed)_t  +  bridge_t

Bridges (SSM -> attention, attention -> SSM): a token on one path reads the other path's latest output in its
document, ``last_j(t)`` (the output of path ``j`` at the latest position ``<= t`` routed to ``j``, 0 if none),
through a per-channel gate::

    bridge_t = tanh(g_sa) * last_ssm(t)        if path_t is attention
             = tanh(g_as) * last_attention(t)  if path_t is the SSM

``g_sa = g_as = 0`` at initialisation, so a model converted from a plain hybrid starts as its source.

Forced routing (``routed_forced``): every token takes the path of ``argmax b_r`` (the router's bias; a converted
Granite-4.0-H layer's own type), at probability 1, without capacity: the block is exactly that path's mixer.

Adaptive state compression (``routed_state_ratios``): the SSM's state ``h_t [P, N]`` keeps ``r = N / ratio``
of its ``N`` dimensions, chosen from a learned importance ``w [N]`` (1 at initialisation) that scales the
state's inputs: ``B'_t = (w * B_t)[kept]``, ``C'_t = C_t[kept]``, so the state is ``[P, r]`` in the forward pass
and in decoding alike. Per layer the ratio is the largest allowed one whose kept dims (the ``r`` largest
``w_i^2``) hold at least ``routed_state_keep`` of ``sum w_i^2``; the metrics report that ratio and the share of
importance it drops, ``1 - sum_kept w_i^2 / sum w_i^2`` (the relative squared error of the state's inputs
``w * B`` when the dropped dims' inputs are read as 0 for uniformly spread ``B``).

Balance loss (Switch Transformer, arXiv 2101.03961, eq. 4, over the two paths): ``coef * 2 * sum_j f_j P_j``,
``f_j`` the fraction of tokens whose first choice is ``j``, ``P_j`` the mean of ``p_t[j]``.

Tensor parallelism: each path splits as its own mixer does (Mamba-2 heads, attention heads); the router, the
gates and the importance are replicated (the router's and gates' inputs and outputs are replicated, so their
gradients are whole on every rank; the importance scales every head's ``B``, so its gradient is partial per
rank and summed). Routing is computed identically on every rank. Sequence and context parallelism are refused
(the compaction needs the whole sequence on a rank).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, field_validator, model_validator
from torch import nn

from chimera.models.channels.moe import _scale_grad
from chimera.models.documents import PackedDocuments
from chimera.models.mixers import attention, mamba2
from chimera.models.mixers.attention import AttentionConfig
from chimera.models.mixers.mamba2 import Mamba2Config
from chimera.models.numerics import at_least_fp32
from chimera.models.spec import Build, ContextParallel, SublayerSpec
from chimera.parallel.sharding import declare, normal, ones, zeros

SSM, ATTENTION, RESIDUAL = 0, 1, 2
PATHS = ("ssm", "attention")
ALLOWED_RATIOS = (1, 2, 4)


class RoutedHybridConfig(Mamba2Config, AttentionConfig):
    """The ``model:`` fields of the routed hybrid (symbol ``Y``): Mamba-2's and attention's, and the router's."""

    routed_capacity_ssm: float = Field(1.0, gt=0, le=1, description="routed hybrid: fraction of tokens the SSM "
                                       "path may take (at every prefix)")
    routed_capacity_attention: float = Field(0.5, gt=0, le=1, description="routed hybrid: fraction of tokens the "
                                             "attention path may take (at every prefix)")
    routed_overflow: str = Field("other", description="routed hybrid: where a token goes whose first choice is "
                                 "full: 'other' (the other path, if it has room) or 'residual'")
    routed_aux_loss_coef: float = Field(0.01, ge=0, description="routed hybrid: weight of the balance loss")
    routed_forced: bool = Field(False, description="routed hybrid: every token takes the path of argmax router "
                                "bias (a converted model's own layer type), without capacity")
    routed_state_ratios: list[int] = Field([1], description="routed hybrid: allowed SSM-state compression ratios "
                                           "(each 1, 2 or 4, dividing ssm_state)")
    routed_state_keep: float = Field(0.9, gt=0, le=1, description="routed hybrid: share of the learned importance "
                                     "the compressed SSM state must keep")

    @field_validator("routed_overflow")
    @classmethod
    def _overflow(cls, v):
        if v not in ("other", "residual"):
            raise ValueError(f"routed_overflow must be 'other' or 'residual', not {v!r}")
        return v

    @model_validator(mode="after")
    def _resolve_routed(self):
        bad = [r for r in self.routed_state_ratios if r not in ALLOWED_RATIOS or self.ssm_state % r]
        if bad or not self.routed_state_ratios:
            raise ValueError(f"routed_state_ratios={self.routed_state_ratios}: each must be one of {ALLOWED_RATIOS} "
                             f"and divide ssm_state={self.ssm_state}")
        try:  # attention's own checks (its head_dim resolved in attention_config())
            self.attention_config()
        except ValidationError as e:
            raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return self

    def ssm_config(self) -> Mamba2Config:
        return Mamba2Config.model_validate(self.model_dump())

    def attention_config(self) -> AttentionConfig:
        return AttentionConfig.model_validate(self.model_dump())


class StateCompression(nn.Module):
    """The SSM state's kept dims and learned importance: ``(B, C) [..., N] -> ((w * B)[kept], C[kept])``."""

    def __init__(self, d_state: int, ratios: list[int], keep: float, partial_grad: bool):
        super().__init__()
        self.d_state, self.ratios, self.keep = d_state, sorted(ratios), keep
        self.last_choice = None
        # [N]: replicated; every head's B is scaled by it, so its gradient is partial over TP
        self.importance = declare(nn.Parameter(torch.empty(d_state)), init=ones, weight_decay=False,
                                  partial_grad_over_tp=partial_grad)

    def choice(self) -> tuple[int, torch.Tensor, float]:
        """The ratio, the kept dims (ascending) and the share of importance dropped, from the current ``w``. While
        ``torch.export`` traces (ONNX), the weights are fixed and the choice is a constant of the graph: the last one
        made eagerly (``export.onnx.state_layout`` builds the decoding state, which makes one, before tracing)."""
        if torch.compiler.is_exporting():
            return self.last_choice
        w2 = self.importance.detach().float().pow(2)
        order = torch.sort(w2, descending=True, stable=True).indices
        total, ratio = w2.sum().clamp(min=1e-30), 1
        for r in self.ratios:
            if w2[order[: self.d_state // r]].sum() >= self.keep * total:
                ratio = max(ratio, r)
        kept = order[: self.d_state // ratio].sort().values
        self.last_choice = ratio, kept, float(1.0 - w2[kept].sum() / total)
        return self.last_choice

    @property
    def size(self) -> int:
        return self.d_state // self.choice()[0]

    def forward(self, B: torch.Tensor, C: torch.Tensor):
        _, kept, _ = self.choice()
        return B.index_select(-1, kept) * self.importance.index_select(0, kept).to(B.dtype), C.index_select(-1, kept)


def admit(first: torch.Tensor, counts: torch.Tensor, n: int, capacity: tuple[float, float], overflow_other: bool):
    """The routing rule at position ``n`` (see the module docstring): ``first [b]`` the first choices, ``counts [b, 2]``
    the tokens each path admitted before ``n`` -> (``path [b]`` in {SSM, ATTENTION, RESIDUAL}, the new counts)."""
    limit = torch.tensor([math.floor(c * (n + 1) + 1e-9) for c in capacity], device=counts.device)  # K_j(n + 1)
    room = counts < limit  # [b, 2]
    other = 1 - first
    path = torch.where(room.gather(1, first[:, None])[:, 0], first,
                       torch.where(room.gather(1, other[:, None])[:, 0] & overflow_other, other, RESIDUAL))
    return path, counts + F.one_hot(path, 3)[:, :2]


def _compact(mask: torch.Tensor):
    """``mask [s, b]`` -> the positions of each sequence's routed tokens, in order, first (``index [L, b]``) and
    which of them are real (``valid [L, b]``); ``L`` at least 1 so that a path always runs (and its parameters
    always get a gradient, 0 when nothing was routed)."""
    index = torch.sort((~mask).to(torch.int8), dim=0, stable=True).indices
    length = max(int(mask.sum(0).max()), 1)
    index = index[:length]
    return index, mask.gather(0, index)


def _latest(y: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """``last(t)``: ``y`` at the latest position ``<= t`` where ``mask``, in ``t``'s document (0 if none)."""
    s = mask.shape[0]
    marker = torch.where(mask, torch.arange(s, device=mask.device)[:, None], -1)
    last = marker.cummax(0).values  # [s, b]
    same = (last >= 0) & (segments.gather(0, last.clamp(min=0)) == segments)
    return y.gather(0, last.clamp(min=0)[..., None].expand_as(y)) * same[..., None]


class RoutedHybrid(nn.Module):
    """``[s, b, d] -> [s, b, d]``: tokens routed to a Mamba-2 path or an attention path (module docstring)."""

    metrics_group = "routed"

    def __init__(self, c: RoutedHybridConfig, b: Build):
        super().__init__()
        assert not b.dims.sequence_parallel and b.dims.cp == 1, "refused by the layout check (whole_sequence)"
        self.dims = b.dims
        self.ssm = mamba2.build(c.ssm_config(), b)
        self.attention = attention.SPECS[0].build(c.attention_config(), b)
        if c.routed_state_ratios != [1]:
            self.ssm.state_projection = StateCompression(c.ssm_state, c.routed_state_ratios, c.routed_state_keep,
                                                         partial_grad=b.dims.tp > 1)
        # W_r [2, d_model], b_r [2]: replicated, gradient whole on every rank (inputs and outputs replicated)
        self.router = nn.Linear(c.d_model, 2)
        declare(self.router.weight, init=normal(b.init_std))
        declare(self.router.bias, init=zeros, weight_decay=False)
        # g_sa, g_as [d_model]: replicated; 0 so that the block starts as its paths alone
        self.bridge_ssm_to_attention = declare(nn.Parameter(torch.empty(c.d_model)), init=zeros, weight_decay=False)
        self.bridge_attention_to_ssm = declare(nn.Parameter(torch.empty(c.d_model)), init=zeros, weight_decay=False)
        self.capacity = (c.routed_capacity_ssm, c.routed_capacity_attention)
        self.overflow_other = c.routed_overflow == "other"
        self.forced = c.routed_forced
        self.aux_loss_coef = c.routed_aux_loss_coef
        self.last_aux_loss, self.last_stats = None, None

    # ---- routing --------------------------------------------------------------------------------

    def _router(self, h: torch.Tensor):
        """``h [..., d]`` -> (``p [..., 2]`` in at least fp32, first choices)."""
        # h's gradient is summed over TP on the way back (it entered the tensor-parallel region); the router, whole
        # on every rank, would count its share tp times: its input's gradient is divided by tp (MoE's router too)
        logits = at_least_fp32(self.router(_scale_grad(h, 1.0 / self.dims.tp)))
        if self.forced:
            first = torch.full(h.shape[:-1], int(self.router.bias.argmax()), dtype=torch.long, device=h.device)
            return torch.ones_like(logits), first
        return logits.softmax(-1), logits.argmax(-1)

    def route(self, first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``first [s, b]`` -> (``path [s, b]``, per position whether the first choice was full); forced: ``first``."""
        if self.forced:
            return first, torch.zeros_like(first, dtype=torch.bool)
        counts = first.new_zeros(first.shape[1], 2)
        paths = []
        for n in range(first.shape[0]):
            path, counts = admit(first[n], counts, n, self.capacity, self.overflow_other)
            paths.append(path)
        path = torch.stack(paths)
        return path, path != first

    def _scale(self, p: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        """``p_t[path_t]`` (0 on the residual), ``[..., 1]``."""
        return torch.where(path < RESIDUAL, p.gather(-1, path.clamp(max=1)[..., None])[..., 0], 0.0)[..., None]

    # ---- forward --------------------------------------------------------------------------------

    def _run_path(self, mixer: nn.Module, h: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
        """``mixer`` over each sequence's routed tokens, compacted in order; its outputs put back, 0 elsewhere."""
        index, valid = _compact(mask)
        sub_segments = segments.gather(0, index).masked_fill(~valid, -1)
        starts = torch.zeros_like(valid)
        starts[1:] = sub_segments[1:] != sub_segments[:-1]
        docs = PackedDocuments(sub_segments, positions.gather(0, index), starts, sub_segments)
        wide = index[..., None].expand(-1, -1, h.shape[-1])
        y = mixer(h.gather(0, wide), docs) * valid[..., None]
        return h.new_zeros(h.shape[:2] + y.shape[2:], dtype=y.dtype).scatter(0, wide, y)

    def forward(self, h: torch.Tensor, docs: PackedDocuments | None = None) -> torch.Tensor:
        s, b, _ = h.shape
        if docs is None:
            segments = torch.zeros(s, b, dtype=torch.long, device=h.device)
            positions = torch.arange(s, device=h.device)[:, None].expand(s, b)
        else:
            segments, positions = docs.segment_ids, docs.position_ids
        p, first = self._router(h)
        path, overflow = self.route(first)
        ys = [self._run_path(mixer, h, path == j, segments, positions)
              for j, mixer in ((SSM, self.ssm), (ATTENTION, self.attention))]
        last_ssm, last_attention = (_latest(y, path == j, segments) for j, y in zip((SSM, ATTENTION), ys))
        out = self._scale(p, path).to(ys[0].dtype) * (ys[0] + ys[1]) + self._bridges(path, last_ssm, last_attention)
        self._record(p, first, path, overflow)
        return out.to(h.dtype)

    def _bridges(self, path, last_ssm, last_attention):
        return ((path == ATTENTION)[..., None] * torch.tanh(self.bridge_ssm_to_attention) * last_ssm
                + (path == SSM)[..., None] * torch.tanh(self.bridge_attention_to_ssm) * last_attention)

    def _record(self, p, first, path, overflow):
        if self.forced:
            self.last_aux_loss = None
        else:
            chosen = F.one_hot(first, 2).float().flatten(0, -2).mean(0)  # f_j
            self.last_aux_loss = self.aux_loss_coef * 2.0 * (chosen * p.flatten(0, -2).mean(0)).sum()
        entropy = -(p * p.clamp(min=1e-30).log()).sum(-1).mean()
        stats = {f"fraction_{name}": float((path == j).float().mean()) for j, name in
                 enumerate(PATHS + ("residual",))}
        stats.update(router_entropy=float(entropy.detach()), capacity_overflow=float(overflow.float().mean()),
                     bridge_ssm_to_attention=float(torch.tanh(self.bridge_ssm_to_attention.detach()).abs().mean()),
                     bridge_attention_to_ssm=float(torch.tanh(self.bridge_attention_to_ssm.detach()).abs().mean()))
        compression = self.ssm.state_projection
        ratio, dropped = (1, 0.0) if compression is None else (lambda r, _, d: (r, d))(*compression.choice())
        stats.update(state_compression_ratio=float(ratio), state_dropped_importance=dropped)
        if self.last_aux_loss is not None:
            stats["balance_loss"] = float(self.last_aux_loss.detach())
        self.last_stats = stats

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The balance loss of the last forward pass (trains the router); None when routing is forced."""
        return self.last_aux_loss if self.training else None

    def metrics(self) -> dict:
        return {} if self.last_stats is None else dict(self.last_stats)

    # ---- decoding -------------------------------------------------------------------------------

    def init_state(self, batch: int, max_len: int):
        w = self.router.weight
        kv_heads = self.attention.k_proj.weight.shape[0] // self.attention.head_dim
        kv = (batch, kv_heads, max_len, self.attention.head_dim)
        return {
            "ssm": self.ssm.init_state(batch, max_len),
            "k": torch.zeros(kv, device=w.device, dtype=w.dtype), "v": torch.zeros(kv, device=w.device, dtype=w.dtype),
            "seen": torch.zeros(batch, max_len, dtype=torch.bool, device=w.device),  # routed to attention
            "counts": torch.zeros(batch, 2, dtype=torch.long, device=w.device),  # A_j(t)
            "last": torch.zeros(2, batch, w.shape[1], device=w.device, dtype=w.dtype),  # last_ssm, last_attention
        }

    # No ``prefill``: a prompt is stepped through (``chimera.models.sublayer.stepped_prefill``). Handing the state
    # over from ``forward`` would mean rebuilding the SSM's state from its compacted routed subsequence and the
    # attention cache at the routed positions; the step is the definition, and prompts here are short.

    def step(self, h: torch.Tensor, state, pos: int) -> torch.Tensor:  # h: [1, b, d]
        p, first = self._router(h[0])
        if self.forced:
            path = first
        else:
            path, state["counts"] = admit(first, state["counts"], pos, self.capacity, self.overflow_other)
        # the SSM advances (conv windows, state) only where the token is routed to it
        before = {k: v.clone() for k, v in state["ssm"].items()}
        y_ssm = self.ssm.step(h, state["ssm"], pos)[0]
        for k, old in before.items():
            on = (path == SSM).view(-1, *([1] * (old.dim() - 1)))
            state["ssm"][k] = torch.where(on, state["ssm"][k], old)
        # attention over the earlier tokens routed to it (and this one, whose output is kept only if routed)
        q, k, v = self.attention._project(h, torch.tensor([pos], device=h.device))
        state["k"][:, :, pos], state["v"][:, :, pos] = k[:, :, 0], v[:, :, 0]
        state["seen"][:, pos] = path == ATTENTION
        allowed = state["seen"].clone()
        allowed[:, pos] = True
        y_attention = self.attention.o_proj(self.attention._attend(q, state["k"], state["v"],
                                                                   allowed[:, None, None, :]))[0]
        y_ssm = torch.where((path == SSM)[:, None], y_ssm, 0.0)
        y_attention = torch.where((path == ATTENTION)[:, None], y_attention, 0.0)
        state["last"][SSM] = torch.where((path == SSM)[:, None], y_ssm, state["last"][SSM])
        state["last"][ATTENTION] = torch.where((path == ATTENTION)[:, None], y_attention, state["last"][ATTENTION])
        out = self._scale(p, path).to(y_ssm.dtype) * (y_ssm + y_attention) + self._bridges(
            path, state["last"][SSM], state["last"][ATTENTION])
        return out.to(h.dtype)[None]


def check_tensor_parallel(c: RoutedHybridConfig, tp: int) -> str | None:
    """Each path splits as its own mixer does."""
    return mamba2.check_tensor_parallel(c.ssm_config(), tp) or attention.check_tensor_parallel(
        c.attention_config(), tp)


def flops_per_token(c: RoutedHybridConfig, seq_len: int) -> dict[str, float]:
    """Each path's own count at its capacity, over the tokens routed to it (an upper bound: a path runs on at most
    its capacity's tokens; the SSM path counted with its whole state), and the router ``[d, 2]``."""
    def routed(capacity: float, flops, config) -> float:
        return capacity * sum(flops(config, max(1, round(capacity * seq_len))).values())

    return {"ssm path": routed(c.routed_capacity_ssm, mamba2.flops_per_token, c.ssm_config()),
            "attention path": routed(c.routed_capacity_attention, attention.SPECS[0].flops_per_token,
                                     c.attention_config()),
            "router": 4.0 * c.d_model}


SPECS = (SublayerSpec("Y", "routed hybrid: a router sends each token to a Mamba-2 or an attention path",
                      RoutedHybridConfig, lambda c, b: RoutedHybrid(c, b), check_tensor_parallel,
                      # an output reads every earlier routed token (attention's cache); but see whole_sequence
                      lambda c: ContextParallel("keys_values"), flops_per_token=flops_per_token,
                      whole_sequence=True),)
