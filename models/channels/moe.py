"""Mixture-of-Experts channel mixer: a router picks ``top_k`` gated MLPs per token.

Drop-in replacement for ``chimera.models.channels.mlp.GatedMLP`` (same ``[s, b, d] -> [s, b, d]`` contract).

Router (Shazeer et al., arXiv 1701.06538; Switch Transformer, Fedus et al., arXiv 2101.03961)::

    logits = x W_r^T                         # W_r [E, d], fp32
    p      = softmax(logits)                 # over the E experts
    S(x)   = top-k experts of p, with weights
             w_i = p_i                       # Jamba (arXiv 2403.19887): softmax, then top-k
             w_i = p_i / sum_{j in S} p_j    # normalize_top_k: Mixtral (arXiv 2401.04088), Qwen-MoE, Granite
    y      = sum_{i in S(x)} w_i E_i(x),   E_i(x) = W_down,i( act(W_gate,i x) * (W_up,i x) )
    y     += E_shared(x)                     # shared_hidden: an always-on shared expert, a gated MLP
                                             # run on every token (Granite-4.0-H's shared_mlp; the shared
                                             # experts of DeepSeek-MoE, arXiv 2401.06066, and Qwen-MoE)

Capacity (GShard, Lepikhin et al., arXiv 2006.16668; Switch Sec. 2.2): with ``capacity_factor``
each expert takes at most ``C = ceil(capacity_factor * T * k / E)`` of the ``T * k`` (token, slot)
assignments, first come first served in token order (tokens flattened from ``[s, b]``, position
major); a dropped assignment contributes zero, the residual connection carries the token.
``capacity_factor=None`` is dropless (MegaBlocks, Gale et al., arXiv 2211.15841): every
assignment is computed.

Auxiliary losses, returned in ``last_aux_loss = aux_loss_coef * aux + z_loss_coef * z``:

* load balancing (Switch Eq. 4, generalised to top-k)::

      aux = E * sum_e f_e * P_e,   f_e = #{(t, slot) routed to e} / (T k),   P_e = mean_t p_e(x_t)

  ``f`` is a count (no gradient); the gradient reaches the router through ``P``. It is 1 for a
  uniform router and ``E`` when everything goes to one expert. This is megatron-core's
  normalisation (``switch_load_balancing_loss_func``); HF Mixtral's ``load_balancing_loss_func``
  divides the counts by ``T`` instead of ``T k``, i.e. it is ``k`` times this value.
* router z-loss (ST-MoE, Zoph et al., arXiv 2202.08906, Eq. 5): ``z = mean_t logsumexp(logits_t)^2``.

The computation is split into small functions so that experts can later live on other ranks
(expert parallelism)::

    route     -> (probs, weights [T, k], experts [T, k])           replicated
    dispatch  -> tokens grouped by expert, [N, d] with counts [E]    local
    [all-to-all: send each expert's group to the rank that owns it; counts travel first]
    experts   -> expert outputs in the same grouped order [N, d]
    [all-to-all back]
    combine   -> y [T, d] = scatter-add of w * expert output onto the tokens

Nothing between ``dispatch`` and ``combine`` looks at token indices, only at the grouped rows and
per-expert counts, so the two all-to-alls slot in without touching either side.

Expert parallelism (``chimera.parallel.experts``): ``W_gate``, ``W_up``, ``W_down`` split along their
expert dim (0) over the expert-parallel ranks, ``E / ep`` experts each; the router and the shared expert
are replicated. Each rank routes its own tokens (so capacity drops are decided where the tokens are, as
without EP) and the two all-to-alls carry the grouped rows to the experts' ranks and back.

Context parallelism (a sequence split over ranks): routing is per token, but the capacity and the
auxiliary losses are defined over the whole micro-batch, so under it they use the whole sequence's
counts: ``C`` from all ``T`` tokens, first come first served in sequence order (the assignments earlier
ranks made to an expert come first), and ``f_e``, ``P_e``, ``z`` as means over all tokens. Each rank
reports its share of the losses (the shares sum to the whole-sequence losses; ``chimera.models.causal_lm``
turns shares into the rank's objective).

Tensor parallelism: every expert is split like ``GatedMLP`` -- ``W_gate``, ``W_up`` by output rows
of the hidden dim, ``W_down`` by input columns -- so each rank computes a partial ``E_i(x)``; the
weighted sum over experts is linear, so the sum over ranks happens once, at the end (all-reduce,
or reduce-scatter to sequence shards), exactly as in ``RowParallel``. The router runs replicated
on every rank on the identical (entered) input and routes identically. Its combine weights
multiply rank-partial expert outputs, so the gradient reaching them -- and the router weight and
``x`` through them -- is partial per rank: ``W_r`` is declared ``partial_grad_over_tp`` (like a
shared kv head) and ``enter_tensor_parallel`` sums ``x``'s gradient. The auxiliary losses are
computed identically on every rank and every rank backpropagates them; their gradient is scaled
by ``1 / tp`` (value unchanged) so that those two sums count it once. The shared expert is a
``GatedMLP`` on the same entered input, split like any MLP; its own row-parallel reduction gives
its output in the routed output's form (whole, or sequence shards), and the two are added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from chimera.models.channels.mlp import ACTIVATIONS, Activation, GatedMLP
from chimera.models.numerics import at_least_fp32
from chimera.models.spec import Build, ContextParallel, SublayerConfig, SublayerSpec, divisibility
from chimera.parallel.context import gather_counts, sum_over_context
from chimera.parallel.dims import ParallelDims
from chimera.parallel.experts import from_experts, to_experts
from chimera.parallel.layers import leave_tensor_parallel
from chimera.parallel.sharding import declare, normal


class MoEConfig(SublayerConfig):
    """The ``model:`` fields of the mixture of experts (symbol ``E``)."""

    moe_experts: int = Field(8, ge=1)
    moe_top_k: int = Field(2, ge=1)
    moe_hidden: int | None = Field(None, ge=1, description="width of each expert (resolved: mlp_hidden)")
    mlp_hidden: int | None = Field(None, ge=1, description="width of each branch of the gated MLP")
    mlp_activation: Activation = Field("gelu_tanh", description="gate of the gated MLP")
    moe_normalize_top_k: bool = Field(False, description="renormalise the top-k router weights to sum to 1")
    moe_capacity_factor: float | None = Field(None, gt=0, description="None: dropless")
    moe_aux_loss_coef: float = Field(0.01, ge=0, description="load-balancing loss weight")
    moe_z_loss_coef: float = Field(0.0, ge=0, description="router z-loss weight")
    moe_shared_hidden: int | None = Field(
        None, ge=1, description="width of a shared expert (gated MLP) in every 'E' sublayer, run on every token and "
        "added to the routed output (Granite's shared_mlp, Megatron's moe_shared_expert_intermediate_size); None: none"
    )

    @model_validator(mode="after")
    def _resolve(self):
        self.moe_hidden = self.moe_hidden or self.mlp_hidden
        if self.moe_hidden is None:
            raise ValueError("the pattern has MoE sublayers ('E'): set moe_hidden or mlp_hidden")
        if self.moe_top_k > self.moe_experts:
            raise ValueError(f"moe_top_k={self.moe_top_k} exceeds moe_experts={self.moe_experts}")
        return self


def _scale_grad(t: torch.Tensor, scale: float) -> torch.Tensor:
    """``t`` in the forward pass; its gradient multiplied by ``scale`` in the backward pass."""
    if scale == 1.0:
        return t
    return t.detach() + scale * (t - t.detach())


# Routing.


@dataclass
class Routing:
    logits: torch.Tensor  # [T, E] fp32
    probs: torch.Tensor  # [T, E] softmax over experts
    weights: torch.Tensor  # [T, k] combine weights, descending
    experts: torch.Tensor  # [T, k] expert ids (long)


def route(logits: torch.Tensor, top_k: int, normalize_top_k: bool) -> Routing:
    """Softmax over experts, then top-k; optionally renormalise the k weights to sum to 1."""
    probs = logits.softmax(dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    if normalize_top_k:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(logits, probs, weights, experts)


def expert_load(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``f_e``: fraction of the ``T * k`` (token, slot) assignments routed to each expert (before drops)."""
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts)
    return counts.to(torch.float32) / experts.numel()


def load_balancing_loss(probs: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """Switch Eq. 4 for top-k: ``E * sum_e f_e P_e`` (``load`` = f, no gradient; ``P`` = mean probs)."""
    num_experts = probs.shape[-1]
    return num_experts * (load.to(probs.dtype) * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE Eq. 5: ``mean_t logsumexp(logits_t)^2``."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def capacity_of(capacity_factor: float | None, tokens: int, top_k: int, num_experts: int) -> int | None:
    """``ceil(capacity_factor * T * k / E)`` assignments per expert; ``None``: dropless."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * tokens * top_k / num_experts)


# Dispatch / experts / combine.


@dataclass
class Dispatch:
    """The kept (token, slot) assignments, grouped by expert (expert-major, token order within)."""

    assignment: torch.Tensor  # [N] flat index t * k + slot of each kept assignment
    token: torch.Tensor  # [N] its token
    counts: torch.Tensor  # [E] kept assignments per expert (rows of each expert's group)
    routed: torch.Tensor  # [E] assignments routed to each expert before drops


def dispatch_plan(experts: torch.Tensor, num_experts: int, capacity: int | None,
                  taken: torch.Tensor | None = None) -> Dispatch:
    """Group the assignments by expert; beyond ``capacity`` per expert, drop the later tokens.

    ``taken [E]``: slots of each expert already used by earlier tokens of the sequence (context parallelism:
    those of earlier ranks' chunks)."""
    top_k = experts.shape[-1]
    flat = experts.reshape(-1)  # index t * k + slot: token order
    order = torch.argsort(flat, stable=True)  # expert-major; stable keeps token order within an expert
    routed = torch.bincount(flat, minlength=num_experts)
    counts = routed
    if capacity is not None:
        room = capacity - (0 if taken is None else taken)
        starts = torch.cumsum(routed, 0) - routed
        rank_in_expert = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        order = order[rank_in_expert < torch.as_tensor(room, device=flat.device).expand(num_experts)[flat[order]]]
        counts = torch.minimum(routed, torch.as_tensor(room, device=flat.device).clamp(min=0))
    return Dispatch(assignment=order, token=order // top_k, counts=counts, routed=routed)


def even_dispatch(tokens: int, top_k: int, num_experts: int, device) -> Dispatch:
    """Every assignment kept, spread as evenly as possible over the experts (no routing decisions: for sizing)."""
    n = tokens * top_k
    counts = torch.tensor([n // num_experts + (e < n % num_experts) for e in range(num_experts)])
    order = torch.arange(n, device=device)
    return Dispatch(assignment=order, token=order // top_k, counts=counts, routed=counts)


def dispatch(x: torch.Tensor, plan: Dispatch) -> torch.Tensor:
    """``x [T, d]`` -> the grouped expert inputs ``[N, d]`` (a token appears once per expert it uses)."""
    return x.index_select(0, plan.token)


def run_experts(grouped: torch.Tensor, counts: list[int], gate_weight: torch.Tensor, up_weight: torch.Tensor,
                down_weight: torch.Tensor, act) -> torch.Tensor:
    """Each expert's gated MLP on its contiguous group of rows: ``[N, d] -> [N, d]`` (partial over TP).

    Weights ``gate/up [E, h, d]``, ``down [E, d, h]`` (``h`` this rank's hidden shard). A loop over
    experts; an expert with no rows still runs (empty matmuls) so every weight gets a gradient.
    """
    outputs = []
    for e, rows in enumerate(grouped.split(counts)):
        hidden = act(rows @ gate_weight[e].to(rows.dtype).T) * (rows @ up_weight[e].to(rows.dtype).T)
        outputs.append(hidden @ down_weight[e].to(rows.dtype).T)
    return torch.cat(outputs)


def combine(expert_out: torch.Tensor, weights: torch.Tensor, plan: Dispatch, tokens: int) -> torch.Tensor:
    """``y_t = sum over t's kept assignments of w * expert output``: ``[N, d] -> [T, d]``; dropped ones add 0."""
    w = weights.reshape(-1).index_select(0, plan.assignment).to(expert_out.dtype)
    y = expert_out.new_zeros(tokens, expert_out.shape[-1])
    return y.index_add(0, plan.token, expert_out * w.unsqueeze(-1))


def dense_combine_weights(routing: Routing, num_experts: int, capacity: int | None) -> torch.Tensor:
    """``[T, E]``: the weight of each expert's output in each token's ``y_t`` (0 where not routed or dropped): the
    dispatch plan as a dense matrix. An assignment is dropped where ``capacity`` assignments earlier in token order
    (index ``t * k + slot``, as ``dispatch_plan``) went to the same expert."""
    tokens, top_k = routing.experts.shape
    chosen = F.one_hot(routing.experts.reshape(-1), num_experts).to(routing.weights.dtype)  # [T k, E]
    if capacity is not None:
        earlier = chosen.cumsum(0) - chosen  # assignments before this one to the same expert
        chosen = chosen * (earlier < capacity).to(chosen.dtype)
    return (chosen * routing.weights.reshape(-1, 1)).view(tokens, top_k, num_experts).sum(1)


def dense_experts(x: torch.Tensor, combine_weights: torch.Tensor, gate_weight: torch.Tensor,
                  up_weight: torch.Tensor, down_weight: torch.Tensor, act) -> torch.Tensor:
    """``y_t = sum_e c_te * down_e(act(gate_e x_t) * up_e x_t)`` with every expert on every token: ``[T, d]``. The
    same sum as dispatch / run_experts / combine, in fixed shapes (no data-dependent group sizes): what a static
    graph (``torch.export``, ONNX) holds. E times the expert FLOPs, so not for training."""
    x = x.to(gate_weight.dtype)
    hidden = act(torch.einsum("td,ehd->teh", x, gate_weight)) * torch.einsum("td,ehd->teh", x, up_weight)
    out = torch.einsum("teh,edh->ted", hidden, down_weight)
    return (out * combine_weights.to(out.dtype).unsqueeze(-1)).sum(1)


class MoE(nn.Module):
    """Top-k routed gated-MLP experts, the channel mixer of Mixtral / Jamba / Switch-style models."""

    ROW_POSITIONS = True  # step takes each row's position (chimera.models.positions)

    def __init__(self, d_model: int, hidden: int, num_experts: int, top_k: int, *, init_std: float,
                 out_std: float, dims: ParallelDims, activation: str = "silu", normalize_top_k: bool = False,
                 capacity_factor: float | None = None, aux_loss_coef: float = 0.01, z_loss_coef: float = 0.0,
                 shared_hidden: int | None = None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None (dropless), got {capacity_factor}")
        self.num_experts, self.top_k = num_experts, top_k
        self.normalize_top_k, self.capacity_factor = normalize_top_k, capacity_factor
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.dims = dims
        self.act = ACTIVATIONS[activation]
        hidden_local = dims.local(hidden, "moe hidden")

        # [E, d]: replicated; gradient partial per rank (it weights rank-partial expert outputs).
        self.router = nn.Linear(d_model, num_experts, bias=False)
        declare(self.router.weight, init=normal(init_std), partial_grad_over_tp=dims.tp > 1)

        def expert_param(shape, std, split_dim):
            return declare(nn.Parameter(torch.empty(shape)), init=normal(std), split_dim=split_dim, expert_dim=0)

        # [E / ep, hidden / tp, d] and [E / ep, d, hidden / tp]: experts split along dim 0 (expert parallel), the
        # hidden dim along dim 1 and 2 (tensor parallel).
        experts_local = dims.local_experts(num_experts)
        self.gate_weight = expert_param((experts_local, hidden_local, d_model), init_std, 1)
        self.up_weight = expert_param((experts_local, hidden_local, d_model), init_std, 1)
        self.down_weight = expert_param((experts_local, d_model, hidden_local), out_std, 2)
        # The always-on shared expert (None: none): a gated MLP of width shared_hidden, split as such.
        self.shared_expert = None if shared_hidden is None else GatedMLP(
            d_model, shared_hidden, init_std=init_std, out_std=out_std, dims=dims, activation=activation)

        self.last_aux_loss: torch.Tensor | None = None
        self.last_stats: dict[str, float] = {}
        self.last_load: torch.Tensor | None = None

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d] -> [..., E]`` in fp32 (or wider)."""
        x = at_least_fp32(x)
        return F.linear(x, self.router.weight.to(x.dtype))

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:  # [s, b, d] -> [s, b, d], per token
        s, b, d = x.shape
        flat = x.reshape(s * b, d)
        routing = route(self.router_logits(flat), self.top_k, self.normalize_top_k)
        if torch.compiler.is_exporting():  # a static graph: the dense form (see dense_experts)
            return self._exported(x, flat, routing)
        plan = self._plan(routing.experts, s * b)

        routed = to_experts(dispatch(flat, plan), plan.counts, self.dims)  # expert parallel: to the experts' ranks
        expert_out = run_experts(routed.rows, routed.counts, self.gate_weight, self.up_weight, self.down_weight,
                                 self.act)
        y = combine(from_experts(expert_out, routed, self.dims), routing.weights, plan, s * b).view(s, b, d)

        if not x.is_meta:
            self._record_losses(routing, plan)
        y = leave_tensor_parallel(y, self.dims, self.dims.sequence_parallel)  # the sum over TP ranks, once
        return y if self.shared_expert is None else y + self.shared_expert(x)

    def _exported(self, x: torch.Tensor, flat: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The forward pass for ``torch.export`` (one process): the experts dense, no router losses recorded."""
        if self.dims.tp > 1 or self.dims.ep > 1:
            raise ValueError("a static graph of the MoE is exported from a model with whole experts (no tensor or "
                             "expert parallelism)")
        tokens = flat.shape[0]
        capacity = capacity_of(self.capacity_factor, tokens, self.top_k, self.num_experts)
        weights = dense_combine_weights(routing, self.num_experts, capacity)
        y = dense_experts(flat, weights, self.gate_weight, self.up_weight, self.down_weight, self.act)
        y = y.to(x.dtype).view(x.shape)
        return y if self.shared_expert is None else y + self.shared_expert(x)

    def _plan(self, experts: torch.Tensor, tokens: int) -> Dispatch:
        """The dispatch of this rank's tokens; under context parallelism the capacity is the whole sequence's and
        the earlier chunks' assignments come first."""
        if experts.is_meta:  # sizing a model on the meta device (chimera.trainer.plan): tokens spread evenly
            return even_dispatch(tokens, self.top_k, self.num_experts, experts.device)
        cp = self.dims.cp
        capacity = capacity_of(self.capacity_factor, tokens * cp, self.top_k, self.num_experts)
        if capacity is None or cp == 1:
            return dispatch_plan(experts, self.num_experts, capacity)
        routed = torch.bincount(experts.reshape(-1), minlength=self.num_experts)
        taken = gather_counts(routed, self.dims)[: self.dims.cp_rank].sum(0)  # by the chunks before this one
        return dispatch_plan(experts, self.num_experts, capacity, taken)

    def _record_losses(self, routing: Routing, plan: Dispatch) -> None:
        """The router losses over the whole micro-batch (every context-parallel chunk); this rank's share."""
        assignments = sum_over_context(torch.tensor(routing.experts.numel(), device=plan.routed.device), self.dims)
        load = sum_over_context(plan.routed, self.dims).to(torch.float32) / assignments  # f_e, whole sequence
        share = routing.experts.shape[0] * self.top_k / assignments  # this chunk's fraction of the tokens
        aux = load_balancing_loss(routing.probs, load) * share  # E sum_e f_e P_e, P_e summed over chunks
        z = router_z_loss(routing.logits) * share
        total = self.aux_loss_coef * aux + self.z_loss_coef * z
        self.last_aux_loss = _scale_grad(total, 1.0 / self.dims.tp)  # see the module docstring (TP)
        self.last_load = load
        dropped = 1.0 - sum_over_context(plan.counts.sum(), self.dims) / assignments
        stats = torch.stack([t.detach().to(aux.dtype) for t in (aux, z, load.max(), load.min(), dropped)])
        self.last_stats = dict(zip(("aux_loss", "z_loss", "expert_load_max", "expert_load_min", "dropped_fraction"),
                                   stats.tolist()))

    # What the generic LM collects from whichever sublayers have it (chimera.models.causal_lm).
    metrics_group = "moe"

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The router losses of the last forward pass: they train the router, added to the training loss."""
        return self.last_aux_loss

    def metrics(self) -> dict:
        """The last forward pass's router losses and expert load, for the metrics line (none before one)."""
        if self.last_load is None:
            return {}
        return {**self.last_stats, "expert_load": [round(float(x), 5) for x in self.last_load]}

    def init_state(self, batch: int, max_len: int):
        return None

    def step(self, x: torch.Tensor, state, pos: int) -> torch.Tensor:
        return self.forward(x)

    def prefill(self, x: torch.Tensor, max_len: int):
        """No state. Dropless routing is per token, so the prompt goes through at once; with a capacity, which
        tokens an expert drops depends on the tokens routed together, so the prompt is stepped as decoding would."""
        if self.capacity_factor is None:
            return self.forward(x), None
        from chimera.models.sublayer import stepped_prefill

        return stepped_prefill(self, x, max_len)


def build(c: MoEConfig, b: Build) -> MoE:
    return MoE(c.d_model, c.moe_hidden, c.moe_experts, c.moe_top_k, init_std=b.init_std, out_std=b.out_std,
               dims=b.dims, activation=c.mlp_activation, normalize_top_k=c.moe_normalize_top_k,
               capacity_factor=c.moe_capacity_factor, aux_loss_coef=c.moe_aux_loss_coef, z_loss_coef=c.moe_z_loss_coef,
               shared_hidden=c.moe_shared_hidden)


def check_expert_parallel(c: MoEConfig, ep: int) -> str | None:
    """Whole experts on each rank."""
    return None if c.moe_experts % ep == 0 else (
        f"parallel.expert={ep} does not divide model.moe_experts={c.moe_experts}; choose a divisor of "
        f"{c.moe_experts}")


def flops_per_token(c: MoEConfig, seq_len: int) -> dict[str, float]:
    """2 per weight a token meets: the router, its ``top_k`` gated-MLP experts and the shared expert (the other
    experts are not visited)."""
    gated_mlp = 3 * c.d_model
    return {"router": 2.0 * c.d_model * c.moe_experts, "experts": 2.0 * gated_mlp * c.moe_top_k * c.moe_hidden,
            "shared expert": 2.0 * gated_mlp * (c.moe_shared_hidden or 0)}


def check_tensor_parallel(c: MoEConfig, tp: int) -> str | None:
    """Every expert (and the shared expert) splits its hidden dim, like the gated MLP."""
    widths = {"model.moe_hidden": c.moe_hidden}
    if c.moe_shared_hidden:
        widths["model.moe_shared_hidden"] = c.moe_shared_hidden
    return divisibility(tp, widths)


SPECS = (SublayerSpec(
    "E", "mixture of experts (gated-MLP experts, top-k router; with moe_shared_hidden also an always-on shared "
    "expert whose output is added to the routed experts', as in Granite-4.0-H / Qwen-MoE / DeepSeek-MoE)",
    MoEConfig, build, check_tensor_parallel, lambda c: ContextParallel("token"),
    check_expert_parallel=check_expert_parallel, flops_per_token=flops_per_token),)
