"""RWKV's channel mix (Peng et al., arXiv 2404.05892, Eqs. 23-24; unchanged since RWKV-4), symbol ``C``.

With the token shift of the time mix (``x_{t-1}``, zeros before a sequence or document start)::

    xk_t  = x_t + (x_{t-1} - x_t) * maa_k
    xr_t  = x_t + (x_{t-1} - x_t) * maa_r
    out_t = sigmoid(W_r xr_t) * (W_v relu(W_k xk_t)^2)

BlinkDL's ``rwkv`` package (0.8.32) names: ``time_maa_k``, ``time_maa_r``, ``key [F, d]``, ``value [d, F]``,
``receptance [d, d]`` (its ``[1, 1, d]`` vectors are ``[d]`` here).

Tensor parallelism splits the hidden width ``F``: ``key`` column parallel, ``value`` row parallel. The gate
``sigmoid(W_r xr)`` is ``d_model`` wide and multiplies the reduced output; since the product is linear in each
rank's partial output, every rank multiplies its partial output by the gate before the reduction, so
``receptance`` and the two mixing vectors are held whole on every rank, each rank's gradient for them partial
(summed over TP), and the layer needs no communication beyond ``value``'s reduction.

Context parallelism: an output reads its own input and the one before (``halo`` of 1).
"""

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from chimera.models.mixers.rwkv6 import _ramp, replicated, token_shift
from chimera.models.spec import Build, ContextParallel, SublayerConfig, SublayerSpec, divisibility
from chimera.parallel.dims import ParallelDims
from chimera.parallel.layers import ColumnParallel, RowParallel, leave_tensor_parallel
from chimera.parallel.sharding import declare, normal


class ChannelMixConfig(SublayerConfig):
    """The ``model:`` fields of RWKV's channel mix (symbol ``C``)."""

    rwkv_ffn_hidden: int | None = Field(None, ge=1, description="RWKV channel mix hidden width (resolved: "
                                        "3.5 x d_model rounded down to a multiple of 32)")

    @model_validator(mode="after")
    def _resolve(self):
        self.rwkv_ffn_hidden = self.rwkv_ffn_hidden or int(self.d_model * 3.5) // 32 * 32
        if not self.rwkv_ffn_hidden:
            raise ValueError(f"d_model={self.d_model} gives an empty RWKV channel mix: set rwkv_ffn_hidden")
        return self


class ChannelMix(nn.Module):
    ROW_POSITIONS = True  # step takes each row's position (chimera.models.positions)
    def __init__(self, d_model: int, hidden: int, *, init_std: float, out_std: float, dims: ParallelDims):
        super().__init__()
        self.dims = dims
        self.time_maa_k = replicated(d_model, _ramp(0.5), dims)  # [d], whole on every rank
        self.time_maa_r = replicated(d_model, _ramp(0.5), dims)
        self.key = ColumnParallel(d_model, hidden, dims, init=normal(init_std))  # [F / tp, d]
        self.value = RowParallel(hidden, d_model, dims, init=normal(out_std))  # [d, F / tp]
        self.receptance = nn.Linear(d_model, d_model, bias=False)  # [d, d], whole on every rank
        declare(self.receptance.weight, init=normal(init_std), partial_grad_over_tp=dims.tp > 1)

    def _mix(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        dx = prev - x
        k = torch.relu(self.key(x + dx * self.time_maa_k)) ** 2
        gate = torch.sigmoid(self.receptance(x + dx * self.time_maa_r))
        # the gate times this rank's partial W_v k, then the sum over ranks (or its sequence shard)
        return leave_tensor_parallel(gate * F.linear(k, self.value.weight), self.dims, self.value.scatter_sequence)

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:  # [s, b, d] -> [s, b, d]
        return self._mix(x, token_shift(x, docs, self.dims))

    def init_state(self, batch: int, max_len: int):
        w = self.receptance.weight
        return {"shift": torch.zeros(batch, w.shape[1], device=w.device, dtype=w.dtype)}

    def prefill(self, x: torch.Tensor, max_len: int):  # x: [s, b, d] -> (out, state): the last input is the shift
        return self.forward(x), {"shift": x[-1].clone()}

    def step(self, x: torch.Tensor, state, pos: int) -> torch.Tensor:  # x: [1, b, d]
        out = self._mix(x, state["shift"].unsqueeze(0))
        state["shift"] = x[0]
        return out


def build(c: ChannelMixConfig, b: Build) -> ChannelMix:
    return ChannelMix(c.d_model, c.rwkv_ffn_hidden, init_std=b.init_std, out_std=b.out_std, dims=b.dims)


def flops_per_token(c: ChannelMixConfig, seq_len: int) -> dict[str, float]:
    """``W_k [F, d]``, ``W_v [d, F]``, ``W_r [d, d]``: 2 per weight (the token shift and gates are pointwise)."""
    d, f = c.d_model, c.rwkv_ffn_hidden
    return {"projections": 2.0 * (d * f + f * d + d * d)}


SPECS = (SublayerSpec("C", "RWKV channel mix", ChannelMixConfig, build,
                      lambda c, tp: divisibility(tp, {"model.rwkv_ffn_hidden": c.rwkv_ffn_hidden}),
                      lambda c: ContextParallel("halo", halo=1), flops_per_token=flops_per_token),)
