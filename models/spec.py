"""What a sublayer kind declares about itself, in its own file, beside its math.

A file in ``models/mixers/`` (token mixers) or ``models/channels/`` (channel mixers) ends with
``SPECS = (SublayerSpec(...), ...)``: for each layer-pattern symbol it implements,

* ``config``: a typed view of the ``model:`` fields it reads (a ``SublayerConfig``), with its own
  defaults, checks and derived values (``dt_rank``, ``moe_hidden or mlp_hidden``) resolved once, when
  the model config is validated. The fields are flat keys of ``model:``; two kinds may read the same
  field (``conv_kernel``, ``num_heads``) if they declare it alike;
* ``build(config, build)``: the module, ``[s, b, d] -> [s, b, d]`` with ``forward(x, docs)``,
  ``init_state(batch, max_len)`` and ``step(x, state, pos)``; and, if it has them, ``auxiliary_loss()``
  (a training-only loss of its last forward pass, which the LM adds: MoE's router losses) and
  ``metrics()`` (a dict for the metrics line, under ``<metrics_group>/<layer>/``);
* ``check_tensor_parallel(config, tp)``: what a tensor-parallel size must divide (a message, or None);
* ``context_parallel``: what it needs from earlier sequence shards when a sequence spans ranks;
* ``check_expert_parallel(config, ep)`` (optional): for kinds with experts, what an expert-parallel size
  must divide; a model none of whose kinds has it cannot use expert parallelism;
* ``pipeline_parallel`` (optional): False for a kind that pipeline stages cannot run (it reads tensors earlier
  sublayers publish in the pass's ``Context``, which stages do not carry);
* ``whole_sequence`` (optional): True for a kind that needs each whole sequence on one rank (it reorders the
  sequence's tokens: the routed hybrid), which context and sequence parallelism refuse;
* ``flops_per_token(config, s)``: forward FLOPs per token at sequence length ``s``, as ``{term: FLOPs}``, each
  term named for the operation it counts (``chimera.models.flops`` states the conventions and adds them up: MFU,
  ``chimera models --flops``, and the cost pipeline stages are balanced by); ``shared_flops_per_token`` (optional):
  what the first sublayer of the kind computes for all of them (GOLD's key cache).

A file in ``models/shared/`` ends with ``STYLE = SharedBlockStyle(...)``: one way of running a shared
block (symbols ``0``, ``1``). ``chimera.models.registry`` finds them all; nothing else names them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import ConfigDict, Field
from torch import nn

from chimera.configs.section import Section
from chimera.parallel.dims import ParallelDims

if TYPE_CHECKING:
    from chimera.models.config import ModelConfig


class ModelFields(Section):
    """The fields of ``model:`` that every sublayer may read."""

    d_model: int = Field(..., ge=1)
    norm_eps: float = Field(1e-6, gt=0)
    kernels: Literal["auto", "reference", "triton"] = Field(
        "auto", description="hot ops (scans, Mamba's fused selective scan, SSD, linear attention, WKV, short conv, "
        "RMSNorm, RoPE, Hyena's gate): the readable reference math or the Triton kernels (chimera.models.ops); auto: "
        "on CUDA, when triton imports, the kernels already checked on a GPU (scan, short conv), else the reference; "
        "triton: every kernel, and without CUDA in Triton's interpreter (TRITON_INTERPRET=1 only; slow, for tests)")


class SublayerConfig(ModelFields):
    """A sublayer kind's view of ``model:``: built from the whole (validated) model mapping, keeping the
    fields it declares. Subclasses resolve derived values in an ``after`` validator, assigning them."""

    model_config = ConfigDict(extra="ignore", validate_assignment=False)


@dataclass(frozen=True)
class Build:
    """What every builder gets besides its config."""

    dims: ParallelDims
    init_std: float  # weights read from the residual stream
    out_std: float  # output projections, scaled with depth (GPT-2) so the residual stream's variance stays O(1)
    layer: int = 0  # the index of the sublayer's unit in the layer pattern (a per-layer seed); 0 outside the stack
    # the sublayer being built is the first of its kind in the layer pattern (a kind whose first use builds what
    # its later uses share holds the parameters for it there)
    first_of_kind: bool = True

    @classmethod
    def of(cls, cfg: ModelConfig, dims: ParallelDims) -> Build:
        return cls(dims, cfg.init_std, cfg.init_std / math.sqrt(2 * len(cfg.layers)))


@dataclass(frozen=True)
class ContextParallel:
    """What a sublayer's output at a position needs from the part of the sequence before it, so that
    a sequence split over context-parallel ranks can be computed shard by shard:

    * ``token``: nothing (position-wise: MLP, MoE);
    * ``halo``: the last ``halo`` inputs before the shard (a sliding window, a short convolution);
    * ``state``: a fixed-size state carried from the shard before (linear recurrences and SSMs: the
      recurrent state plus their short convolution's window);
    * ``keys_values``: keys and values of every earlier position (global attention).
    """

    needs: Literal["token", "halo", "state", "keys_values"]
    halo: int = 0


def divisibility(tp: int, values: dict[str, int], why: str = "") -> str | None:
    """The first ``field = value`` that ``tp`` does not divide, as the message ``validate_layout`` prints."""
    for field, value in values.items():
        if value % tp:
            return (f"parallel.tensor={tp} does not divide {field}={value}"
                    + (f" ({why})" if why else f"; choose a divisor of {value}"))
    return None


@dataclass(frozen=True)
class SublayerSpec:
    symbol: str
    summary: str
    config: type[SublayerConfig]
    build: Callable[[SublayerConfig, Build], nn.Module]
    check_tensor_parallel: Callable[[SublayerConfig, int], str | None]
    context_parallel: Callable[[SublayerConfig], ContextParallel]
    # what an expert-parallel size must divide (a message), for kinds whose parameters split over experts
    check_expert_parallel: Callable[[SublayerConfig, int], str | None] | None = None
    # forward FLOPs per token at sequence length s, {term: FLOPs} (chimera.models.flops); every kind declares it
    flops_per_token: Callable[[SublayerConfig, int], dict[str, float]] | None = None
    # forward FLOPs per token the first sublayer of the kind computes for all of them (GOLD's key cache)
    shared_flops_per_token: Callable[[SublayerConfig, int], dict[str, float]] | None = None
    # False: the kind reads what earlier sublayers publish in the pass's Context, which pipeline stages do not carry
    pipeline_parallel: bool = True
    # True: the kind needs each whole sequence on one rank, so context and sequence parallelism are refused
    whole_sequence: bool = False


@dataclass(frozen=True)
class SharedBlockStyle:
    """How a shared block (one set of parameters, used at several depths) is built and used.

    ``build_block(cfg, index, build)`` makes block ``index`` (held once, in ``CausalLM.shared``);
    ``build_use(block, index, fed, cfg, build)`` makes one use of it, a module of the layer stack with
    ``forward(x, context)``. With ``feeds_next``, a use is fused with the sublayer after its symbol
    (``fed``), whose input it changes. ``config``: the fields only this style reads; ``check(cfg)``
    raises ``ValueError`` for a pattern it cannot run; ``flops_per_token(cfg, index, s)`` one use's forward FLOPs
    per token (``chimera.models.flops``)."""

    name: str
    summary: str
    config: type[SublayerConfig]
    build_block: Callable[[ModelConfig, int, Build], nn.Module]
    build_use: Callable[[nn.Module, int, nn.Module | None, ModelConfig, Build], nn.Module]
    feeds_next: bool
    check: Callable[[ModelConfig], None]
    check_tensor_parallel: Callable[[SublayerConfig, int], str | None]
    reads_embeddings: bool = False  # reads the model's input embeddings (``Context.embeddings``): pipeline stages
    # must then carry them
    # forward FLOPs per token of one use of block ``index`` at sequence length s, the fed sublayer not included,
    # {term: FLOPs}; None: the block's sublayers' (chimera.models.flops)
    flops_per_token: Callable[[ModelConfig, int, int], dict[str, float]] | None = None
