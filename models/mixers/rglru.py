"""Griffin's recurrent block with the Real-Gated Linear Recurrent Unit (De et al., arXiv 2402.19427).

Recurrent block (Sec. 2.4, Fig. 2)::

    y   = GeLU(W_y x)                        # gate branch
    u   = RG-LRU(Conv1D_k(W_x x))            # recurrent branch, temporal conv of width k = 4
    out = W_out (y * u)

RG-LRU (Eqs. 1-4), per channel, with block-diagonal gate weights (one block per head)::

    r_t = sigma(W_a u_t + b_a)               # recurrence gate            (1)
    i_t = sigma(W_x u_t + b_x)               # input gate                 (2)
    a_t = a^(c r_t),  a = sigma(Lambda)      # c = 8, in log space        (3)
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * u_t)                   (4)

``Lambda`` is initialised so that ``a^c`` is uniform in [0.9, 0.999] (Sec. 2.4). RecurrentGemma
(``reset_unnormalized``) feeds a document's first token unscaled: ``h_t = i_t * u_t`` there.

Tensor parallelism splits channels by whole heads: ``W_y``, ``W_x`` are column parallel, the
gates' blocks, ``Lambda`` and the conv split with them, ``W_out`` is row parallel. The recurrence is
per channel, so it needs no communication.

Reference: ``forward`` runs the whole sequence with a parallel scan (``chimera.models.scan``);
``step`` advances one token with O(1) state (conv window + h), which is also what context
parallelism carries from one sequence shard to the next: the conv's ``k - 1`` inputs as a halo, and
``h`` entering the chunk, combined from the earlier chunks' (decay product, final state) pairs
(``chimera.parallel.context``). ``prefill`` hands over the forward's last ``h`` and conv inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from chimera.models.conv import CausalConv1d
from chimera.models.numerics import at_least_fp32
from chimera.models.ops import dispatch
from chimera.models.positions import at_start
from chimera.models.spec import Build, ContextParallel, SublayerConfig, SublayerSpec, divisibility
from chimera.parallel.context import linear_scan_across
from chimera.parallel.dims import ParallelDims
from chimera.parallel.layers import ColumnParallel, RowParallel
from chimera.parallel.sharding import declare, normal, zeros

GATE_C = 8.0  # the constant c of Eq. (3)


class RGLRUConfig(SublayerConfig):
    """The ``model:`` fields of the recurrent block (symbol ``R``)."""

    rnn_width: int | None = Field(None, ge=1, description="RG-LRU width (resolved: d_model)")
    rnn_heads: int | None = Field(None, ge=1, description="blocks of the block-diagonal RG-LRU gates "
                                  "(resolved: num_heads)")
    num_heads: int = Field(1, ge=1)
    conv_kernel: int = Field(4, ge=1)
    linear_bias: bool = Field(False, description="biases on recurrent-block, attention-output and MLP projections")
    rglru_reset_unnormalized: bool = Field(
        False, description="RG-LRU: at a document's first token the input is not scaled by sqrt(1 - a^2)"
    )

    @model_validator(mode="after")
    def _resolve(self):
        if self.rnn_width is not None and self.rnn_heads is not None and self.rnn_width % self.rnn_heads:
            raise ValueError(f"rnn_heads={self.rnn_heads} must divide rnn_width={self.rnn_width}")
        self.rnn_width = self.rnn_width or self.d_model
        self.rnn_heads = self.rnn_heads or self.num_heads
        return self


def _lambda_init(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Lambda with a^c ~ U[0.9, 0.999], i.e. a = u^(1/c), Lambda = logit(a)."""
    a = t.uniform_(0.9, 0.999, generator=g).pow_(1.0 / GATE_C)
    return t.copy_(torch.log(a) - torch.log1p(-a))


def log_decay_rate(a_param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``c log sigma(Lambda) = -c softplus(-Lambda)`` per channel: Eq. (3) is ``log a_t = r_t`` times this."""
    return F.softplus(-a_param.to(dtype)).mul_(-GATE_C)


def coefficients(gate_a: torch.Tensor, gate_x: torch.Tensor, u: torch.Tensor, a_param: torch.Tensor,
                 unnormalized: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. (1)-(4)'s ``(a_t, b_t = sqrt(1 - a_t^2) * i_t * u_t)`` from the gates' pre-activations (``gate_inputs``);
    ``unnormalized``: where ``b_t = i_t u_t`` (RecurrentGemma's documents' first tokens), or None."""
    r = torch.sigmoid(gate_a)  # (1)
    i = torch.sigmoid(gate_x)  # (2)
    log_a = r * log_decay_rate(a_param, u.dtype)  # (3): log a_t = c r_t log sigma(Lambda)
    a = torch.exp(log_a)
    multiplier = torch.sqrt(-torch.expm1(2 * log_a))  # sqrt(1 - a_t^2), accurate near a_t = 1
    if unnormalized is not None:
        multiplier = torch.where(unnormalized.unsqueeze(-1), torch.ones_like(multiplier), multiplier)
    return a, multiplier * i * u


def states(gate_a: torch.Tensor, gate_x: torch.Tensor, u: torch.Tensor, a_param: torch.Tensor, reset: torch.Tensor,
           reset_unnormalized: bool, dims: ParallelDims, kernels: str = "auto") -> torch.Tensor:
    """The reference: every ``h_t`` (fp32 or wider, ``[s, b, w]``) of this rank's chunk, ``h_{t-1}`` dropped where
    ``reset [s, b]``: the coefficients, then the scan (``chimera.models.scan``), across context-parallel ranks.
    Its CPU fast path: ``chimera.models.ops.rglru_cpu``."""
    a, b = coefficients(gate_a, gate_x, u, a_param, reset if reset_unnormalized else None)
    a = a.masked_fill(reset.unsqueeze(-1), 0.0)
    return linear_scan_across(dispatch.scan_with(kernels), a, b, dims)[0]  # (4)


class RGLRU(nn.Module):
    """The gated recurrence of Eqs. (1)-(4) over this rank's heads."""

    def __init__(self, width: int, heads: int, dims: ParallelDims, reset_unnormalized: bool = False,
                 kernels: str = "auto"):
        super().__init__()
        self.dims, self.kernels = dims, kernels
        self.reset_unnormalized = reset_unnormalized
        self.heads_local = dims.local(heads, "rnn_heads")
        self.block = width // heads
        std = 1.0 / math.sqrt(self.block)
        blocks = (self.heads_local, self.block, self.block)  # [heads, in, out], applied as u @ W

        def recurrence_param(shape, init):  # split by head; never weight-decayed
            return declare(nn.Parameter(torch.empty(shape)), init=init, split_dim=0, weight_decay=False)

        self.gate_a_weight = recurrence_param(blocks, normal(std))
        self.gate_a_bias = recurrence_param(blocks[:2], zeros)
        self.gate_x_weight = recurrence_param(blocks, normal(std))
        self.gate_x_bias = recurrence_param(blocks[:2], zeros)
        self.a_param = recurrence_param(self.heads_local * self.block, _lambda_init)

    def _blockdiag(self, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        uh = u.unflatten(-1, (self.heads_local, self.block))
        return (torch.einsum("...hi,hij->...hj", uh, w.to(u.dtype)) + b.to(u.dtype)).flatten(-2)

    def gate_inputs(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gates' pre-activations ``W_a u_t + b_a`` and ``W_x u_t + b_x`` of Eqs. (1), (2)."""
        return (self._blockdiag(u, self.gate_a_weight, self.gate_a_bias),
                self._blockdiag(u, self.gate_x_weight, self.gate_x_bias))

    def coefficients(self, u: torch.Tensor, reset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a_t, sqrt(1 - a_t^2) * i_t * u_t)``: the recurrence is then ``h_t = a_t h_{t-1} + b_t``.

        ``reset`` (broadcastable to ``u`` without its last dim) marks documents' first tokens."""
        return coefficients(*self.gate_inputs(u), u, self.a_param, reset if self.reset_unnormalized else None)

    def forward(self, u: torch.Tensor, reset: torch.Tensor | None = None) -> torch.Tensor:  # [s, b, w]
        """All states; ``reset [s, b]`` marks a document's first token, where ``h_{t-1}`` is dropped.

        The sequence's first token always starts a document (under context parallelism: only the first
        chunk's first token; later chunks continue the state of the chunks before them)."""
        return self.states(u, reset).to(u.dtype)

    def states(self, u: torch.Tensor, reset: torch.Tensor | None = None) -> torch.Tensor:  # [s, b, w], fp32
        """``h_t`` at every position, in fp32 or wider (``forward`` before the cast back to ``u``'s dtype)."""
        first = torch.zeros(u.shape[:2], dtype=torch.bool, device=u.device)
        first[0] = self.dims.cp_rank == 0
        reset = first if reset is None else reset | first
        u = at_least_fp32(u)
        return dispatch.rglru_states(*self.gate_inputs(u), u, self.a_param, reset, self.reset_unnormalized,
                                     self.dims, kernels=self.kernels)

    def step(self, u: torch.Tensor, h: torch.Tensor, first: bool = False) -> torch.Tensor:  # [b, w] -> [b, w]
        reset = torch.full(u.shape[:1], first, dtype=torch.bool, device=u.device)
        a, b = self.coefficients(at_least_fp32(u), reset)
        return b if first else a * h + b


class RecurrentBlock(nn.Module):
    """Symbol ``R``: the recurrent temporal-mixing block of Griffin and Hawk."""

    ROW_POSITIONS = True  # step takes each row's position (chimera.models.positions)

    def __init__(self, d_model: int, width: int, heads: int, conv_kernel: int, *, init_std: float,
                 out_std: float, dims: ParallelDims, bias: bool = False, reset_unnormalized: bool = False,
                 kernels: str = "auto"):
        super().__init__()
        width_local = dims.local(width, "rnn_width")
        # W_y, W_x [width / tp, d]: split along dim 0 (channels, whole heads)
        self.linear_y = ColumnParallel(d_model, width, dims, init=normal(init_std), bias=bias)
        self.linear_x = ColumnParallel(d_model, width, dims, init=normal(init_std), bias=bias)
        # [width / tp, k]: split along dim 0
        self.conv = CausalConv1d(width_local, conv_kernel, dims=dims, kernels=kernels)
        self.rglru = RGLRU(width, heads, dims, reset_unnormalized, kernels)
        # W_out [d, width / tp]: split along dim 1; output all-reduced (or reduce-scattered)
        self.linear_out = RowParallel(width, d_model, dims, init=normal(out_std), bias=bias)

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:  # [s, b, d] -> [s, b, d]
        """``docs``: packed documents (``chimera.models.documents``); state never crosses a boundary."""
        y = F.gelu(self.linear_y(x), approximate="tanh")
        if docs is None:
            u = self.rglru(self.conv(self.linear_x(x)))
        else:
            u = self.rglru(self.conv(self.linear_x(x), docs), reset=docs.starts)
        return self.linear_out(y * u)

    def init_state(self, batch: int, max_len: int):
        w = self.conv.weight
        return {
            "conv": self.conv.init_state(batch, device=w.device, dtype=w.dtype),
            "h": torch.zeros(batch, w.shape[0], device=w.device, dtype=torch.float32),
        }

    def prefill(self, x: torch.Tensor, max_len: int):  # x: [s, b, d] -> (out, state)
        """The prompt in one pass; the state: the conv's last inputs and the last ``h``."""
        y = F.gelu(self.linear_y(x), approximate="tanh")
        xw = self.linear_x(x)
        h = self.rglru.states(self.conv(xw))
        return self.linear_out(y * h.to(x.dtype)), {"conv": self.conv.state_after(xw), "h": h[-1]}

    def step(self, x: torch.Tensor, state, pos: int) -> torch.Tensor:  # x: [1, b, d]
        y = F.gelu(self.linear_y(x), approximate="tanh")
        u, state["conv"] = self.conv.step(self.linear_x(x)[0], state["conv"])
        state["h"] = self.rglru.step(u, state["h"], first=at_start(pos))
        return self.linear_out(y * state["h"].to(x.dtype).unsqueeze(0))


def flops_per_token(c: RGLRUConfig, seq_len: int) -> dict[str, float]:
    """``W_y``, ``W_x``, ``W_out`` (2 per weight); the conv's taps; the block-diagonal gates ``W_a``, ``W_x`` of
    Eqs. (1)-(2) (``w / heads`` inputs per channel); the recurrence (4), ``h = a h + b``: 2 per channel. The gates'
    nonlinearities and ``sqrt(1 - a^2)`` are pointwise (not counted)."""
    d, w = c.d_model, c.rnn_width
    return {"projections": 2.0 * (2 * d * w + w * d), "conv": 2.0 * c.conv_kernel * w,
            "gates": 2.0 * 2 * w * (w // c.rnn_heads), "scan": 2.0 * w}


def build(c: RGLRUConfig, b: Build) -> RecurrentBlock:
    return RecurrentBlock(c.d_model, c.rnn_width, c.rnn_heads, c.conv_kernel, init_std=b.init_std, out_std=b.out_std,
                          dims=b.dims, bias=c.linear_bias, reset_unnormalized=c.rglru_reset_unnormalized,
                          kernels=c.kernels)


def check_tensor_parallel(c: RGLRUConfig, tp: int) -> str | None:
    """Channels split by whole heads."""
    return divisibility(tp, {"model.rnn_heads": c.rnn_heads, "model.rnn_width": c.rnn_width})


SPECS = (SublayerSpec("R", "RG-LRU recurrent block (Griffin)", RGLRUConfig, build, check_tensor_parallel,
                      lambda c: ContextParallel("state"), flops_per_token=flops_per_token),)
