"""Based: causal linear attention with the 2nd-order Taylor feature map (Arora et al., arXiv 2402.18668).

Per head, with queries and keys projected to ``f = feature_dim`` (16) dims and values to ``p = head_dim``::

    q_t, k_t = W_q x_t, W_k x_t  [f],   v_t = W_v x_t  [p]
    phi(x)   = [1, x / f^(1/4), vec(x x^T) / (sqrt(2) sqrt(f))]        # D = 1 + f + f^2 features (Sec. 4)
    K(q, k)  = phi(q) . phi(k) = 1 + (q.k)/sqrt(f) + (q.k)^2 / (2 f)    # 2nd-order Taylor series of exp(q.k/sqrt f)
    o_t      = sum_{s<=t} K(q_t, k_s) v_s / (sum_{s<=t} K(q_t, k_s) + eps)
    out      = W_o [o^1; ...; o^H]

``K >= 1/2`` everywhere (``1 + x + x^2/2 = ((1 + x)^2 + 1) / 2``), so the denominator never vanishes; ``eps``
is the reference's (1e-6 in fla's kernels and Based's ``fla_parallel`` path, 1e-12 in its ``quadratic`` path).
The feature map and its scaling are those of Based's ``TaylorExp`` and fla's ``TaylorFeatureMap``; the kernel
identity is what fla's ``naive_parallel_based`` computes (``q * f^-0.5``, then ``1 + a + a^2 / 2``).

Three forms of the same function (each below, each tested against the others in fp64):

* ``based_parallel``, the quadratic (attention) form: the masked ``[s, s]`` matrix of ``K(q_l, k_s)`` times
  ``[v, 1]``, from the kernel identity (never expanding ``phi``);
* ``based_recurrent``, the recurrent form with O(1) state: ``S_t = S_{t-1} + phi(k_t) [v_t, 1]^T`` (``[D, p+1]``
  per head: the numerator's ``phi(k) v^T`` sums and, in the last column, the denominator's ``phi(k)`` sums),
  ``[num_t, den_t] = phi(q_t)^T S_t``; run over the sequence by a linear scan (``chimera.models.scan``);
* ``based_chunked`` (the module's forward): chunks of ``chunk`` tokens, within a chunk the quadratic form,
  between chunks the state ``S`` at each chunk's end, carried by a scan over chunks. The quadratic form within
  chunks (``within_chunks``) has a Triton kernel with the Taylor map fused (``chimera.models.ops.based``,
  ``model.kernels``).

Packed documents: the state is dropped at a document's first token (the recurrence's decay is 0 there, 1
elsewhere); the quadratic form masks query/key pairs of different documents.

Tensor parallelism splits heads: ``W_q``, ``W_k``, ``W_v`` are column parallel (whole heads per rank), ``W_o`` is
row parallel; the attention itself is per head and needs no communication.

Context parallelism (``state``): the state entering a rank's part of the sequence is the sum of the earlier
ranks' chunk states (decay 1; 0 past a document start), continued from rank to rank by the scan over chunks
(``chimera.parallel.context.linear_scan_across``); decoding carries the same ``[H, D, p+1]`` state.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import nn

from chimera.models.numerics import at_least_fp32
from chimera.models.ops import dispatch
from chimera.models.scan import linear_scan
from chimera.models.spec import Build, ContextParallel, SublayerConfig, SublayerSpec, divisibility
from chimera.parallel.context import linear_scan_across
from chimera.parallel.dims import SINGLE_PROCESS, ParallelDims
from chimera.parallel.layers import ColumnParallel, RowParallel
from chimera.parallel.sharding import normal


class BasedConfig(SublayerConfig):
    """The ``model:`` fields of Based linear attention (symbol ``B``)."""

    num_heads: int = Field(1, ge=1)
    based_feature_dim: int = Field(16, ge=1, description="Based: query/key dims per head fed to the Taylor map")
    based_head_dim: int | None = Field(None, ge=1, description="Based: value dims per head "
                                       "(resolved: d_model / num_heads)")
    based_chunk: int = Field(64, ge=1, description="Based: chunk length of the chunked form (the forward pass)")
    based_eps: float = Field(1e-6, gt=0, description="Based: added to the normaliser (fla: 1e-6)")

    @model_validator(mode="after")
    def _resolve(self):
        if self.based_head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model} for Based "
                                 f"(or set based_head_dim)")
            self.based_head_dim = self.d_model // self.num_heads
        return self

    @property
    def expanded_dim(self) -> int:
        return expanded_dim(self.based_feature_dim)


def expanded_dim(feature_dim: int) -> int:
    """``D``: the number of Taylor features of an ``f``-dim query or key."""
    return 1 + feature_dim + feature_dim ** 2


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """``phi(x) = [1, x / f^(1/4), vec(x x^T) / (sqrt(2) sqrt(f))]``: ``[..., f] -> [..., 1 + f + f^2]``."""
    f = x.shape[-1]
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    return torch.cat([torch.ones_like(x[..., :1]), x / f ** 0.25, outer / (math.sqrt(2.0) * math.sqrt(f))], dim=-1)


def taylor_kernel(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``K(q_l, k_s) = 1 + a + a^2 / 2`` with ``a = q_l . k_s / sqrt(f)``: ``[..., l, f] x [..., s, f] -> [..., l, s]``
    (equal to ``phi(q_l) . phi(k_s)``, without forming the ``D`` features)."""
    a = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return 1.0 + a + 0.5 * a * a


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """``[v, 1]``: the last column of the state then sums the denominator's ``phi(k)``."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _normalised(out: torch.Tensor, eps: float) -> torch.Tensor:
    """``[num, den] -> num / (den + eps)``."""
    return out[..., :-1] / (out[..., -1:] + eps)


def based_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reset: torch.Tensor | None = None,
                   eps: float = 1e-6) -> torch.Tensor:
    """The quadratic form. ``q, k [s, b, h, f]``, ``v [s, b, h, p]`` -> ``o [s, b, h, p]``; ``reset [s, b]`` marks
    documents' first tokens (a query sees keys of its own document only)."""
    s = q.shape[0]
    scores = taylor_kernel(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3))  # [b, h, l, s]
    visible = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    if reset is not None:
        document = reset.long().cumsum(0).t()  # [b, s]: index of each token's document
        visible = visible & (document[:, :, None] == document[:, None, :])  # [b, l, s]
        visible = visible.unsqueeze(1)
    out = (scores * visible) @ _with_ones(v).permute(1, 2, 0, 3)  # [b, h, l, p + 1]
    return _normalised(out.permute(2, 0, 1, 3), eps)


def based_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reset: torch.Tensor | None = None,
                    eps: float = 1e-6) -> torch.Tensor:
    """The recurrent form, every state of ``S_t = a_t S_{t-1} + phi(k_t) [v_t, 1]^T`` (``a_t = 0`` at a document's
    first token, else 1) by a linear scan; ``[num_t, den_t] = phi(q_t)^T S_t``. Shapes as ``based_parallel``; the
    states take ``[s, b, h, D, p + 1]``: a reference, not the training path."""
    updates = taylor_features(k).unsqueeze(-1) * _with_ones(v).unsqueeze(-2)  # [s, b, h, D, p + 1]
    keep = torch.ones(q.shape[:2], dtype=q.dtype, device=q.device) if reset is None else (~reset).to(q.dtype)
    states = linear_scan(keep[:, :, None, None, None], updates)
    out = torch.einsum("sbhd,sbhde->sbhe", taylor_features(q), states)
    return _normalised(out, eps)


def within_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document: torch.Tensor | None) -> torch.Tensor:
    """Step 1 of ``based_chunked``, the quadratic form inside each chunk: ``out_l = sum_{s <= l} K(q_l, k_s) v_s`` over
    the keys of ``l``'s document (``q, k [..., l, f]``, ``v [..., l, e]``; ``document``: broadcastable to ``[..., l]``,
    the index of each position's document in its chunk, or None: one document). Its Triton kernel, the Taylor map
    fused: ``chimera.models.ops.based``."""
    n = q.shape[-2]
    visible = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()  # [l, s]
    if document is not None:
        visible = visible & (document[..., :, None] == document[..., None, :])
    return (taylor_kernel(q, k) * visible) @ v


def based_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int, reset: torch.Tensor | None = None,
                  eps: float = 1e-6, dims: ParallelDims = SINGLE_PROCESS, kernels: str = "auto") -> torch.Tensor:
    """The chunked form. Shapes as ``based_parallel``. Inside, tensors are ``[b, h, c, l, ...]`` (chunk ``c``,
    position ``l`` in it). Under context parallelism the inputs are this rank's part of the sequence; the scan
    between chunks continues from the state the earlier ranks' chunks leave (``chimera.parallel.context``).
    ``kernels``: ``model.kernels`` for step 1 (``chimera.models.ops.dispatch``)."""
    s, b = q.shape[:2]
    pad = -s % chunk

    def chunks(t):  # [s, b, ...] -> [b, c, l, ...]; zero padding at the end: no keys, queries dropped
        if pad:
            t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])
        return t.movedim(0, 1).unflatten(1, (-1, chunk))

    def head_chunks(t):  # [s, b, h, e] -> [b, h, c, l, e]
        return chunks(t).permute(0, 3, 1, 2, 4)

    qc, kc, vc = head_chunks(q), head_chunks(k), head_chunks(_with_ones(v))
    if reset is None:
        document = alive = survives = None
        keep = torch.ones(b, qc.shape[2], dtype=q.dtype, device=q.device)  # [b, c]
    else:
        starts = chunks(reset.long())  # [b, c, l]: 1 at documents' first tokens
        document = starts.cumsum(-1).unsqueeze(1)  # [b, 1, c, l]: documents started in the chunk up to l
        alive = (document == 0).unsqueeze(-1).to(q.dtype)  # [b, 1, c, l, 1]: the entering state reaches l
        survives = (document == document[..., -1:]).unsqueeze(-1).to(q.dtype)  # key s reaches the chunk's end
        keep = (document[:, 0, :, -1] == 0).to(q.dtype)  # [b, c]: the chunk passes the state entering it on

    # 1. Within a chunk: the quadratic form.
    out = dispatch.based_within_chunks(qc, kc, vc, document, kernels=kernels)  # [b, h, c, l, p + 1]

    # 2. Each chunk's keys in the state at its end: sum_s phi(k_s) [v_s, 1]^T.
    fk = taylor_features(kc)  # [b, h, c, l, D]
    if survives is not None:
        fk = fk * survives
    chunk_states = fk.transpose(-1, -2) @ vc  # [b, h, c, D, p + 1]

    # 3. Between chunks: S_end[c] = keep[c] S_end[c - 1] + chunk_states[c].
    decay = keep.t()[:, :, None, None, None]  # [c, b, 1, 1, 1]
    ends, first = linear_scan_across(linear_scan, decay, chunk_states.movedim(2, 0), dims)
    first = torch.zeros_like(ends[:1]) if first is None else first.unsqueeze(0)  # the state before the 1st chunk
    entering = torch.cat([first, ends[:-1]]).movedim(0, 2)  # [b, h, c, D, p + 1]

    # 4. The entering state read out inside the chunk, up to the chunk's first document start.
    carried = taylor_features(qc) @ entering
    out = out + (carried if alive is None else carried * alive)
    out = out.permute(2, 3, 0, 1, 4).flatten(0, 1)[:s]  # [s, b, h, p + 1]
    return _normalised(out, eps)


class BasedLinearAttention(nn.Module):
    """Symbol ``B``: ``[s, b, d_model] -> [s, b, d_model]`` over this rank's heads."""

    ROW_POSITIONS = True  # step takes each row's position (chimera.models.positions)

    def __init__(self, d_model: int, num_heads: int, *, feature_dim: int = 16, head_dim: int, chunk: int = 64,
                 eps: float = 1e-6, init_std: float, out_std: float, dims: ParallelDims, kernels: str = "auto"):
        super().__init__()
        self.feature_dim, self.head_dim, self.chunk, self.eps, self.dims = feature_dim, head_dim, chunk, eps, dims
        self.kernels = kernels
        self.heads_local = dims.local(num_heads, "num_heads")
        # W_q, W_k [H / tp * f, d] and W_v [H / tp * p, d]: split along dim 0, by head
        self.q_proj = ColumnParallel(d_model, num_heads * feature_dim, dims, init=normal(init_std))
        self.k_proj = ColumnParallel(d_model, num_heads * feature_dim, dims, init=normal(init_std))
        self.v_proj = ColumnParallel(d_model, num_heads * head_dim, dims, init=normal(init_std))
        # W_o [d, H / tp * p]: split along dim 1; output all-reduced (or reduce-scattered)
        self.o_proj = RowParallel(num_heads * head_dim, d_model, dims, init=normal(out_std))

    def project(self, x: torch.Tensor):
        """``x [..., d]`` -> ``q, k [..., h, f]``, ``v [..., h, p]`` in (at least) fp32."""
        q, k, v = (at_least_fp32(proj(x)).unflatten(-1, (self.heads_local, -1))
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        return q, k, v

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:  # [s, b, d] -> [s, b, d]
        """``docs``: packed documents (``chimera.models.documents``); the state never crosses a boundary."""
        q, k, v = self.project(x)
        o = based_chunked(q, k, v, self.chunk, None if docs is None else docs.starts, self.eps, self.dims,
                          self.kernels)
        return self.o_proj(o.flatten(-2).to(x.dtype))

    def init_state(self, batch: int, max_len: int):
        w = self.o_proj.weight
        shape = (batch, self.heads_local, expanded_dim(self.feature_dim), self.head_dim + 1)
        return {"kv": torch.zeros(shape, device=w.device, dtype=torch.promote_types(w.dtype, torch.float32))}

    def prefill(self, x: torch.Tensor, max_len: int):  # x: [s, b, d] -> (out, state)
        """The prompt in one pass (chunked form); the state ``S = sum_s phi(k_s) [v_s, 1]^T`` (no decay)."""
        q, k, v = self.project(x)
        o = based_chunked(q, k, v, self.chunk, None, self.eps, self.dims, self.kernels)
        kv = torch.einsum("sbhd,sbhe->bhde", taylor_features(k), _with_ones(v))
        return self.o_proj(o.flatten(-2).to(x.dtype)), {"kv": kv}

    def step(self, x: torch.Tensor, state, pos: int) -> torch.Tensor:  # x: [1, b, d]
        q, k, v = self.project(x[0])  # [b, h, f], [b, h, p]
        state["kv"] = state["kv"] + taylor_features(k).unsqueeze(-1) * _with_ones(v).unsqueeze(-2)
        o = _normalised(torch.einsum("bhd,bhde->bhe", taylor_features(q), state["kv"]), self.eps)
        return self.o_proj(o.flatten(-2).to(x.dtype).unsqueeze(0))


def build(c: BasedConfig, b: Build) -> BasedLinearAttention:
    return BasedLinearAttention(c.d_model, c.num_heads, feature_dim=c.based_feature_dim, head_dim=c.based_head_dim,
                                chunk=c.based_chunk, eps=c.based_eps, init_std=b.init_std, out_std=b.out_std,
                                dims=b.dims, kernels=c.kernels)


def check_tensor_parallel(c: BasedConfig, tp: int) -> str | None:
    """Heads split over ranks."""
    return divisibility(tp, {"model.num_heads": c.num_heads}, "Based splits whole heads over tensor-parallel ranks")


def flops_per_token(c: BasedConfig, seq_len: int) -> dict[str, float]:
    """The chunked form's matrix products: the projections (2 per weight), plus per head the chunk's quadratic form
    (scores over ``f`` dims and the weighted ``[v, 1]``, against all ``chunk`` keys of the chunk: the causal mask is
    applied after the product) and the state's update and read-out (``2 x 2 D (p + 1)``)."""
    h, f, p = c.num_heads, c.based_feature_dim, c.based_head_dim
    return {"projections": 2.0 * c.d_model * h * (2 * f + 2 * p),
            "chunk products": h * 2.0 * c.based_chunk * (f + p + 1),
            "state update and read-out": h * 4.0 * c.expanded_dim * (p + 1)}


SPECS = (SublayerSpec("B", "Based linear attention (Taylor feature map)", BasedConfig, build, check_tensor_parallel,
                      lambda c: ContextParallel("state"), flops_per_token=flops_per_token),)
