"""The Hyena operator (Poli et al., arXiv 2302.10866), and StripedHyena's modal form of its long filter.

Operator of order ``N`` on ``u [s, d]`` (Sec. 3.1, Def. 3.1), with ``N + 1`` projections, each followed by a
short depthwise causal convolution (``T_n`` of length ``k``, 3 in the paper)::

    (x^N, ..., x^1, v) = T(W_in u + b_in)                  # N + 1 streams of d channels
    z^1     = x^1 * v                                       # gate
    z^{n+1} = x^{n+1} * (h^n (*) z^n + D^n z^n)             # long causal conv, skip D^n, gate; n = 1 .. N-1
    y       = W_out z^N + b_out

``(*)`` is the causal convolution over the whole sequence, ``(h (*) z)_t = sum_{j <= t} h_{t-j} z_j``, per
channel. ``N = 2`` (one long filter) is the paper's language models and StripedHyena's ``ParallelGatedConvBlock``
(``x2 * (h (*) (x1 * v) + D x1 v)``). The streams are interleaved by head: the projection's rows are laid out
``[heads, N + 1, d / heads]`` (StripedHyena's ``column_split_hyena``), so that a split by head is contiguous.

The long filters ``h^n_t`` (``hyena_filter``):

* ``implicit`` (the paper, Sec. 3.3): a function of the position, ``h_t = Window(t) * FFN(PositionalEncoding(t))``:
  ``PE(t) = [t / T, cos(2 pi k t / T), sin(2 pi k t / T)]_{k=1..K}`` (``T = hyena_filter_max_len``, ``2K + 1 =
  hyena_filter_emb``), an MLP of three sine layers ``sin(omega * (W a + b))`` (learnable frequencies ``omega``) and a
  linear read-out to every channel, and the exponential-decay window ``exp(-alpha_c t / T)``, the decay rate
  ``alpha_c`` spread over the channels from ``|ln 0.01| / 1.5`` to ``|ln 0.01| / 0.3`` (channel ``c``'s window falls to
  1% somewhere between 150% and 30% of ``T``). Its filter has as many taps as the sequence.
* ``modal`` (StripedHyena, its ``HyenaInferenceEngine``): ``h_t = Re(sum_{m<S} R_m p_m^t)``, ``S = hyena_state``
  complex poles ``p_m`` and residues ``R_m`` per channel, stored as real pairs ``[..., 2]`` like the package's
  ``filter.poles`` / ``filter.residues``. It is the impulse response of the diagonal linear recurrence
  ``s_t = p s_{t-1} + z_t``, ``y_t = Re(R . s_t)``.

* ``explicit`` (StripedHyena 2 / Evo 2's multi-hybrid, arXiv 2503.01868; symbols ``X`` and ``D``): the taps
  themselves are parameters, a depthwise causal FIR of a fixed length: ``X`` short explicit
  (``hyena_short_filter_len``, 7 in Evo 2), ``D`` medium regularised (``hyena_medium_filter_len``, 128 in Evo 2), whose
  taps are multiplied by a fixed decay ``exp(-beta_c t / len)`` (``beta_c`` spread over the channels from ``|ln 0.01|
  / 1.5`` to ``|ln 0.01| / 0.3``), which keeps them from leaning on their far end. Being FIRs they run as depthwise
  convolutions (``CausalConv1d``), decode with a window of ``len - 1`` inputs and, under context parallelism, take
  a halo (rule ``halo``: ``(k - 1) + (N - 1)(len - 1)`` positions, the short conv's and the filters' together).

Reference and fast path: ``forward`` materialises the filters for the sequence's length and convolves by FFT,
``O(L log L)`` (``fft_long_conv``); ``direct_long_conv`` is the definition, the sum over lags as a Toeplitz matrix,
beside it, and the tests hold one to the other and both to the step-by-step recurrence. With ``model.kernels``
the short convs and explicit FIRs take the short-conv kernel and the gate and skip after each long convolution
(``gate_with_skip``) a fused one (``chimera.models.ops.hyena``); the FFT itself stays torch's (cuFFT on a GPU).

Decoding (``init_state`` + ``step``):

* ``modal``: the recurrence above, an ``O(S)`` complex state per channel and filter; exact, since the filter *is*
  that recurrence's impulse response. A model trained with ``hyena_filter: modal`` decodes exactly in O(1) per token.
  Its complex numbers are real pairs ``[..., 2]`` throughout the filter, the prefill and the step (``p^t`` from
  ``|p|^t`` and ``t arg p``; ``chimera.models.complex_pairs``), so the ONNX graphs, which have no complex element
  type, trace the same code.
* ``implicit``: an exact cache of every input to the long convolution (``O(L)`` per channel) and the filter's first
  ``max_len`` taps, evaluated once: ``y_t = sum_{j <= t} h_{t-j} z_j``. We do not fit a modal form to an implicit
  filter (a least-squares fit of poles and residues to ``h`` decodes approximately, with an error that depends on the
  filter); a model meant to decode in O(1) trains in modal form. ``fit_modal`` gives such a fit (Prony's method),
  for measuring how far an implicit filter is from a few modes: it recovers a modal filter exactly, and its error on
  an implicit one is what the tests measure.

Tensor parallelism splits heads: ``W_in`` (column parallel, whole heads with all their streams), the short conv, the
filters' channels (the implicit filter's read-out rows, the poles and residues) and ``D`` split with them, ``W_out``
is row parallel. The implicit filter's sine MLP is replicated, its gradient partial per rank (each computes its
channels' taps from it). Nothing in the convolutions communicates.

Context parallelism (a sequence split over ranks in contiguous chunks):

* short convs: a halo of ``k - 1`` inputs (``chimera.models.conv.CausalConv1d``);
* ``implicit`` (rule ``keys_values``): the long convolution needs every earlier input: each rank gathers the long
  conv's input over the whole sequence (``gather_sequence``), convolves it by FFT, and keeps its chunk;
* ``modal`` (rule ``state``): within its chunk a rank convolves by FFT as if the chunk started the sequence, then adds
  the response to the state entering the chunk, ``Re(R p^{tau + 1} s_in)`` at the chunk's position ``tau``. Each rank's
  chunk leaves ``(p^{len}, s_out)`` (its decay and its final state from zero); ``s_in`` is their fold over the earlier
  chunks, ``s <- p^len s + s_out``, as for any linear recurrence (``chimera.parallel.context``).

Packed documents: the short convs keep their taps within a document; the long convolution runs per document (each
document gathered into a zero-padded row of its own, convolved by FFT, scattered back), and under context parallelism
the modal state entering a chunk reaches only the document continuing into it, and a chunk in which a document
starts passes on only that document's state.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from chimera.models import complex_pairs
from chimera.models.conv import CausalConv1d
from chimera.models.numerics import at_least_fp32
from chimera.models.ops import dispatch
from chimera.models.spec import Build, ContextParallel, SublayerConfig, SublayerSpec, divisibility
from chimera.parallel.context import gather_sequence, local_chunk
from chimera.parallel.dims import ParallelDims
from chimera.parallel.layers import ColumnParallel, RowParallel
from chimera.parallel.sharding import declare, normal

WINDOW_TARGET, WINDOW_FAST, WINDOW_SLOW = 0.01, 0.3, 1.5  # the implicit filter's window: 1% at 30% .. 150% of T


class HyenaConfig(SublayerConfig):
    """The ``model:`` fields of the Hyena operator (symbol ``H``)."""

    num_heads: int = Field(1, ge=1)
    hyena_filter: Literal["implicit", "modal"] = Field(
        "implicit", description="Hyena long filter: implicit (positional MLP x window) or modal (poles, residues)")
    hyena_order: int = Field(2, ge=2, description="Hyena order N: N + 1 projections, N - 1 long convolutions")
    hyena_short_kernel: int = Field(3, ge=1, description="Hyena: length of the short depthwise conv on projections")
    hyena_short_bias: bool = Field(True, description="Hyena: bias on the short depthwise conv")
    hyena_bias: bool = Field(True, description="Hyena: biases on the input and output projections")
    hyena_state: int = Field(4, ge=1, description="Hyena modal filter: poles per channel")
    hyena_filter_emb: int = Field(33, ge=3, description="Hyena implicit filter: positional encoding size (odd)")
    hyena_filter_width: int = Field(64, ge=1, description="Hyena implicit filter: width of its sine MLP")
    hyena_filter_max_len: int = Field(2048, ge=1, description="Hyena implicit filter: the length T positions are "
                                      "scaled by (and its window's time scale)")
    hyena_filter_sine_freq: float = Field(1.0, gt=0, description="Hyena implicit filter: initial sine frequency")

    @model_validator(mode="after")
    def _check(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model} (Hyena splits its "
                             "channels by head)")
        if self.hyena_filter_emb % 2 == 0:
            raise ValueError(f"hyena_filter_emb={self.hyena_filter_emb} must be odd (t plus a cos and a sin per band); "
                             f"use {self.hyena_filter_emb + 1}")
        return self


class ShortExplicitConfig(HyenaConfig):
    """The ``model:`` fields of StripedHyena 2's short explicit Hyena (symbol ``X``)."""

    hyena_short_filter_len: int = Field(7, ge=1, description="Hyena X: taps of the short explicit filter")


class MediumRegularizedConfig(HyenaConfig):
    """The ``model:`` fields of StripedHyena 2's medium regularised Hyena (symbol ``D``)."""

    hyena_medium_filter_len: int = Field(128, ge=1, description="Hyena D: taps of the medium regularised filter")


# ---- the long causal convolution ---------------------------------------------------------------------


def direct_long_conv(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The definition, ``y_t = sum_{j <= t} h_{t-j} z_j``: ``z [s, b, c]``, ``h [c, >= s]`` -> ``[s, b, c]``.

    The sum over lags as one Toeplitz matrix ``[t, j, c] = h_{t-j}`` (0 above the diagonal): ``O(s^2)``."""
    s = z.shape[0]
    lag = torch.arange(s, device=z.device)[:, None] - torch.arange(s, device=z.device)[None, :]  # [t, j]
    toeplitz = h[:, lag.clamp(min=0)] * (lag >= 0)  # [c, t, j]
    return torch.einsum("ctj,jbc->tbc", toeplitz, z)


def fft_long_conv(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``direct_long_conv`` by FFT, ``O(s log s)``: both zero-padded to ``2s`` so the circular product is causal."""
    s = z.shape[0]
    n = 2 * s
    spectrum = torch.fft.rfft(z, n=n, dim=0) * torch.fft.rfft(h[:, :s].t(), n=n, dim=0).unsqueeze(1)
    return torch.fft.irfft(spectrum, n=n, dim=0)[:s]


def long_conv(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``h (*) z``: by FFT, except in a graph ``torch.export`` traces for ONNX, which has no complex tensors (the
    FFT's spectrum): there the definition, ``direct_long_conv`` (``O(s^2)``, s at most the decoding cache)."""
    return direct_long_conv(z, h) if torch.compiler.is_exporting() else fft_long_conv(z, h)


def gate_with_skip(g: torch.Tensor, y: torch.Tensor, z: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """The step after a long convolution ``y = h^n (*) z^n``: ``z^{n+1} = g (y + D^n z^n)``, ``g = x^{n+1}`` the gate
    and ``D^n [c]`` the skip (``chimera.models.ops.hyena`` fuses it)."""
    return g * (y + D * z)


def long_conv_within_documents(z: torch.Tensor, h: torch.Tensor, segment_ids: torch.Tensor, conv=long_conv
                               ) -> torch.Tensor:
    """``conv`` run per document: ``segment_ids [s, b]`` (a change starts a document, and so does position 0).

    Every document is gathered into a zero-padded row of its own ``[longest, documents, c]``, convolved from its
    start, and scattered back: no tap reaches into an earlier document."""
    s, b = segment_ids.shape
    new = torch.ones_like(segment_ids, dtype=torch.bool)
    new[1:] = segment_ids[1:] != segment_ids[:-1]
    doc = new.long().cumsum(0) - 1  # [s, b]: the document's index within its row
    per_row = doc[-1] + 1
    doc = doc + (per_row.cumsum(0) - per_row)  # index among all rows' documents
    t = torch.arange(s, device=z.device)[:, None].expand(s, b)
    pos = t - torch.where(new, t, 0).cummax(0).values  # position within the document
    rows = z.new_zeros(int(pos.max()) + 1, int(per_row.sum()), z.shape[-1])
    rows = rows.index_put((pos.flatten(), doc.flatten()), z.flatten(0, 1))
    return conv(rows, h)[pos, doc]


# ---- the filters -------------------------------------------------------------------------------------


class ImplicitFilter(nn.Module):
    """``h^n_t = Window_c(t) FFN(PE(t))`` for ``filters`` long convs over this rank's channels (Sec. 3.3)."""

    def __init__(self, filters: int, channels: int, emb: int, width: int, max_len: int, sine_freq: float,
                 dims: ParallelDims):
        super().__init__()
        self.channels, self.max_len, self.bands, self.dims = channels, max_len, (emb - 1) // 2, dims
        self.channels_local = dims.local(channels, "d_model")

        def shared(shape, init):  # replicated; each rank computes its channels' taps from it: gradient partial
            return declare(nn.Parameter(torch.empty(shape)), init=init, partial_grad_over_tp=dims.tp > 1)

        def freq(t, g):
            return t.fill_(sine_freq)

        sizes = [emb, width, width, width]
        self.weights = nn.ParameterList(shared((o, i), normal(1.0 / math.sqrt(i))) for i, o in zip(sizes, sizes[1:]))
        self.biases = nn.ParameterList(shared((o,), normal(1.0)) for o in sizes[1:])
        self.freqs = nn.ParameterList(shared((o,), freq) for o in sizes[1:])
        # [filters, channels / tp, width]: split along dim 1 (channels)
        self.readout = declare(nn.Parameter(torch.empty(filters, self.channels_local, width)),
                               init=normal(1.0 / math.sqrt(width)), split_dim=1)

    def positional_encoding(self, length: int, dtype) -> torch.Tensor:  # [length, emb]
        t = torch.arange(length, dtype=dtype, device=self.readout.device)[:, None] / self.max_len
        k = torch.arange(1, self.bands + 1, dtype=dtype, device=t.device)
        return torch.cat([t, torch.cos(2 * math.pi * k * t), torch.sin(2 * math.pi * k * t)], dim=-1)

    def window(self, length: int, dtype) -> torch.Tensor:  # [channels / tp, length]
        first = self.dims.tp_rank * self.channels_local
        c = torch.arange(first, first + self.channels_local, dtype=dtype, device=self.readout.device)
        fast, slow = -math.log(WINDOW_TARGET) / WINDOW_FAST, -math.log(WINDOW_TARGET) / WINDOW_SLOW
        alpha = slow + (fast - slow) * c / max(self.channels - 1, 1)
        t = torch.arange(length, dtype=dtype, device=c.device) / self.max_len
        return torch.exp(-alpha[:, None] * t)

    def forward(self, length: int) -> torch.Tensor:
        """The taps ``h [filters, channels / tp, length]``."""
        a = self.positional_encoding(length, self.readout.dtype)
        for w, b, f in zip(self.weights, self.biases, self.freqs):
            a = torch.sin(f * (a @ w.t() + b))
        return torch.einsum("lw,fcw->fcl", a, self.readout) * self.window(length, a.dtype)


def _pole_init(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``p = r e^{i theta}``: ``1 - r`` log-uniform in [1e-3, 0.5] (memories of 2 to 1000 steps), ``theta`` in
    [0, pi]."""
    r = 1 - t.new_empty(t.shape[:-1]).uniform_(math.log(1e-3), math.log(0.5), generator=g).exp()
    theta = t.new_empty(t.shape[:-1]).uniform_(0, math.pi, generator=g)
    return t.copy_(torch.stack([r * torch.cos(theta), r * torch.sin(theta)], -1))


class ModalFilter(nn.Module):
    """``h^n_t = Re(sum_m R_m p_m^t)`` per channel: poles and residues ``[filters, channels / tp, S, 2]``."""

    def __init__(self, filters: int, channels: int, state: int, dims: ParallelDims):
        super().__init__()
        local = dims.local(channels, "d_model")

        def modal(init):  # split along dim 1 (channels); never weight-decayed
            return declare(nn.Parameter(torch.empty(filters, local, state, 2)), init=init, split_dim=1,
                           weight_decay=False)

        self.poles = modal(_pole_init)
        self.residues = modal(normal(1.0 / math.sqrt(state)))

    def modes(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Filter ``n``'s ``(p, R)``, real pairs ``[channels / tp, S, 2]`` (fp32 or wider)."""
        return at_least_fp32(self.poles[n]), at_least_fp32(self.residues[n])

    def powers(self, n: int, t: torch.Tensor) -> torch.Tensor:
        """``p^t = |p|^t e^{i t arg p}`` of filter ``n`` at times ``t [L]``: real pairs ``[channels / tp, S, L, 2]``."""
        p = self.modes(n)[0]
        log_r = 0.5 * torch.log(p[..., 0] ** 2 + p[..., 1] ** 2)
        angle = torch.atan2(p[..., 1], p[..., 0]).unsqueeze(-1) * t.to(p.dtype)
        r_t = torch.exp(log_r.unsqueeze(-1) * t.to(p.dtype))
        return torch.stack([r_t * torch.cos(angle), r_t * torch.sin(angle)], -1)

    def forward(self, length: int) -> torch.Tensor:
        """The taps ``[filters, channels / tp, length]``."""
        t = torch.arange(length, device=self.poles.device)
        taps = [complex_pairs.mul(self.modes(n)[1].unsqueeze(-2), self.powers(n, t))[..., 0].sum(-2)
                for n in range(self.poles.shape[0])]
        return torch.stack(taps)


class ExplicitFilter(nn.Module):
    """``filters`` depthwise causal FIRs of ``length`` taps over this rank's channels (``X``; with ``decay``, ``D``)."""

    def __init__(self, filters: int, channels: int, length: int, decay: bool, dims: ParallelDims,
                 kernels: str = "auto"):
        super().__init__()
        self.length, self.decay, self.dims, self.channels = length, decay, dims, channels
        local = dims.local(channels, "d_model")
        # each [channels / tp, length], split along dim 0; weight[:, -1] multiplies the current input
        self.convs = nn.ModuleList(CausalConv1d(local, length, bias=False, dims=dims, kernels=kernels)
                                   for _ in range(filters))

    def weight(self, n: int) -> torch.Tensor:
        """Filter ``n``'s conv weight ``[channels / tp, length]``, its decay applied (``D``)."""
        w = self.convs[n].weight
        if not self.decay:
            return w
        local = w.shape[0]
        first = self.dims.tp_rank * local
        c = torch.arange(first, first + local, dtype=w.dtype, device=w.device)
        fast, slow = -math.log(WINDOW_TARGET) / WINDOW_FAST, -math.log(WINDOW_TARGET) / WINDOW_SLOW
        beta = slow + (fast - slow) * c / max(self.channels - 1, 1)
        lag = torch.arange(self.length - 1, -1, -1, dtype=w.dtype, device=w.device) / self.length  # weight's order
        return w * torch.exp(-beta[:, None] * lag)

    def forward(self, length: int) -> torch.Tensor:
        """The taps ``h [filters, channels / tp, length]`` (``h[..., t]`` for lag ``t``; 0 beyond the filter)."""
        taps = torch.stack([self.weight(n).flip(-1) for n in range(len(self.convs))])
        return taps[..., :length] if length <= self.length else torch.nn.functional.pad(taps, (0, length - self.length))

    def convolve(self, n: int, z: torch.Tensor, docs) -> torch.Tensor:
        """Filter ``n`` over ``z [s, b, c]``: the conv module run with the (decayed) weight (halo, documents)."""
        conv = self.convs[n]
        if not self.decay:
            return conv(z, docs)
        return torch.func.functional_call(conv, {"weight": self.weight(n)}, (z, docs))


def fit_modal(h: torch.Tensor, modes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prony's method: poles and residues, real pairs ``[c, modes, 2]``, with ``h_t ~ Re(sum_m R_m p_m^t)`` for taps
    ``h [c, L]`` (``L > 2 modes``).

    The poles are the roots of the order-``modes`` linear prediction ``h_t = sum_k a_k h_{t-k}`` fitted by least
    squares (the eigenvalues of its companion matrix); the residues then solve the Vandermonde system
    ``h_t = sum_m R_m p_m^t`` by complex least squares (real ``h``: conjugate poles get conjugate residues, so the sum
    is real and taking ``Re`` loses nothing). Exact when ``h`` has at most ``modes`` modes; ill-conditioned with many
    (measured: 64 modes over 1024 taps gives poles outside the unit circle and a diverging fit)."""
    c, length = h.shape
    h = h.double()
    lags = torch.stack([h[:, modes - k: length - k] for k in range(1, modes + 1)], -1)  # [c, L - modes, modes]
    a = torch.linalg.lstsq(lags, h[:, modes:].unsqueeze(-1)).solution[..., 0]  # [c, modes]
    companion = torch.zeros(c, modes, modes, dtype=h.dtype)
    companion[:, 0] = a
    companion[:, 1:, :-1] = torch.eye(modes - 1, dtype=h.dtype)
    poles = torch.linalg.eigvals(companion)  # [c, modes]
    vandermonde = poles.unsqueeze(1) ** torch.arange(length, dtype=h.dtype)[None, :, None]  # [c, L, modes]
    residues = torch.linalg.lstsq(vandermonde, h.to(poles.dtype).unsqueeze(-1)).solution[..., 0]
    return torch.view_as_real(poles), torch.view_as_real(residues)


# ---- the operator ------------------------------------------------------------------------------------


class Hyena(nn.Module):
    """Symbol ``H``: the Hyena operator of order ``N`` over this rank's heads."""

    def __init__(self, c: HyenaConfig, *, init_std: float, out_std: float, dims: ParallelDims, kind: str | None = None,
                 filter_len: int = 0, kernels: str = "auto"):
        """``kind``: ``short`` (``X``) or ``medium`` (``D``): FIRs of ``filter_len`` taps; default ``hyena_filter``.
        ``kernels``: ``model.kernels`` (``chimera.models.ops.dispatch``: the short convs, the FIRs, the gate)."""
        super().__init__()
        d, self.order, self.dims, self.kernels = c.d_model, c.hyena_order, dims, kernels
        self.kind = kind or c.hyena_filter
        self.heads_local = dims.local(c.num_heads, "num_heads")
        self.head_dim = d // c.num_heads
        self.channels_local = self.heads_local * self.head_dim
        streams = self.order + 1
        # W_in [(N + 1) d / tp, d], rows [heads, N + 1, d / heads]: split along dim 0 (whole heads)
        self.in_proj = ColumnParallel(d, streams * d, dims, init=normal(init_std), bias=c.hyena_bias)
        # [(N + 1) d / tp, k]: split along dim 0 with the projection's rows
        self.short_conv = CausalConv1d(streams * self.channels_local, c.hyena_short_kernel, bias=c.hyena_short_bias,
                                       dims=dims, kernels=kernels)
        filters = self.order - 1
        if self.kind in ("short", "medium"):
            self.filter = ExplicitFilter(filters, d, filter_len, self.kind == "medium", dims, kernels)
        elif self.kind == "implicit":
            self.filter = ImplicitFilter(filters, d, c.hyena_filter_emb, c.hyena_filter_width, c.hyena_filter_max_len,
                                         c.hyena_filter_sine_freq, dims)
        else:
            self.filter = ModalFilter(filters, d, c.hyena_state, dims)
        # D [N - 1, d / tp]: split along dim 1 (channels)
        self.D = declare(nn.Parameter(torch.empty(filters, self.channels_local)), init=normal(1.0), split_dim=1,
                         weight_decay=False)
        # W_out [d, d / tp]: split along dim 1; output all-reduced (or reduce-scattered)
        self.out_proj = RowParallel(d, d, dims, init=normal(out_std), bias=c.hyena_bias)

    def _streams(self, p: torch.Tensor) -> list[torch.Tensor]:
        """``[..., (N + 1) c]`` -> ``[x^1, ..., x^N, v]`` of ``[..., c]``; rows: ``[heads, (x^N .. x^1, v), hd]``."""
        p = p.unflatten(-1, (self.heads_local, self.order + 1, self.head_dim))
        by_row = [p[..., i, :].flatten(-2) for i in range(self.order + 1)]
        return by_row[self.order - 1::-1] + [by_row[self.order]]

    # -- the long convolution of the whole sequence (forward)

    def _long_conv(self, n: int, z: torch.Tensor, docs) -> torch.Tensor:
        """``h^n (*) z`` for this rank's chunk ``z [s, b, c]`` (fp32 or wider)."""
        if isinstance(self.filter, ExplicitFilter):  # a FIR: the halo of its taps under context parallelism
            return self.filter.convolve(n, z, docs)
        if self.kind == "implicit":
            whole = gather_sequence(z, self.dims)  # every earlier input (the rule keys_values)
            h = self.filter(whole.shape[0])[n]
            if docs is None:
                y = long_conv(whole, h)
            else:
                y = long_conv_within_documents(whole, h, docs.all_segment_ids)
            return local_chunk(y, self.dims, 0)
        h = self.filter(z.shape[0])[n]
        y = long_conv(z, h) if docs is None else long_conv_within_documents(z, h, docs.segment_ids)
        return y if self.dims.cp == 1 else y + self._entering_response(n, z, docs)

    def _entering_response(self, n: int, z: torch.Tensor, docs) -> torch.Tensor:
        """Modal filter under context parallelism: ``Re(R p^{tau+1} s_in)`` at chunk position ``tau``, ``s_in`` the
        state the earlier chunks leave (for the document continuing into this chunk only)."""
        s = z.shape[0]
        residues = complex_pairs.as_complex(self.filter.modes(n)[1])  # [c, S]
        t = torch.arange(s + 1, device=z.device)
        powers = complex_pairs.as_complex(self.filter.powers(n, t))  # [c, S, s + 1]: p^0 .. p^s
        if docs is None:
            last_doc = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
            first_doc, passes = last_doc, last_doc[0]
        else:
            starts = docs.starts
            first_doc = starts.long().cumsum(0) == 0  # before any document starts in this chunk
            last_doc = (starts.flip(0).long().cumsum(0).flip(0) - starts.long()) == 0  # no start after tau
            passes = ~starts.any(0)  # [b]: the entering state crosses the chunk
        # this chunk's final state from zero, of its last document: sum_j p^{s-1-j} z_j  -> [b, c, S]
        final = torch.einsum("jbc,csj->bcs", (z * last_doc.unsqueeze(-1)).to(powers.dtype), powers[..., :s].flip(-1))
        decay = powers[..., s].unsqueeze(0) * passes[:, None, None]  # [b, c, S]
        pairs = gather_sequence(complex_pairs.as_pairs(torch.stack([decay, final])).unsqueeze(0), self.dims)
        pairs = complex_pairs.as_complex(pairs)  # [cp, 2, b, c, S]
        entering = torch.zeros_like(final)
        for c in range(self.dims.cp - 1):
            # times 0 rather than skipped for chunks at or after this one: every rank's graph is alike
            before = float(c < self.dims.cp_rank)
            entering = before * (pairs[c, 0] * entering + pairs[c, 1]) + (1.0 - before) * entering
        response = torch.einsum("bcs,cst->tbc", entering, residues.unsqueeze(-1) * powers[..., 1:]).real
        return response * first_doc.unsqueeze(-1)

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:  # [s, b, d] -> [s, b, d]
        """``docs``: packed documents (``chimera.models.documents``); no filter tap crosses a boundary."""
        return self._operator(self.in_proj(x), docs)

    def _operator(self, projected: torch.Tensor, docs=None, long_inputs: list | None = None) -> torch.Tensor:
        """From ``W_in u + b_in`` on; each long convolution's input ``z^n`` is appended to ``long_inputs``."""
        p = self.short_conv(projected, docs)
        *gates, v = self._streams(at_least_fp32(p))
        z = gates[0] * v
        for n in range(self.order - 1):
            if long_inputs is not None:
                long_inputs.append(z)
            z = dispatch.hyena_gate_with_skip(gates[n + 1], self._long_conv(n, z, docs), z, self.D[n],
                                              kernels=self.kernels)
        return self.out_proj(z.to(projected.dtype))

    def prefill(self, x: torch.Tensor, max_len: int):  # x: [s, b, d] -> (out, state)
        """The prompt in one pass; the state from the inputs of its convolutions: the short conv's and each FIR's
        last inputs, the implicit filter's cache of every input, or the modal state ``s = sum_j p^(s-1-j) z_j``."""
        projected, inputs = self.in_proj(x), []
        out = self._operator(projected, None, inputs)
        state = self.init_state(x.shape[1], max_len)
        state["conv"] = self.short_conv.state_after(projected)
        for n, z in enumerate(inputs):
            if isinstance(self.filter, ExplicitFilter):
                state["windows"][n] = self.filter.convs[n].state_after(z)
            elif self.kind == "implicit":
                state["inputs"][n, : z.shape[0]] = z
            else:
                powers = self.filter.powers(n, torch.arange(z.shape[0], device=z.device))  # p^0 .. p^(s-1)
                state["modes"][n] = torch.einsum("jbc,csjk->bcsk", z.to(powers.dtype), powers.flip(-2))
        return out, state

    # -- decoding

    def init_state(self, batch: int, max_len: int):
        w = self.short_conv.weight
        dtype = torch.promote_types(w.dtype, torch.float32)
        state = {"conv": self.short_conv.init_state(batch, device=w.device, dtype=w.dtype)}
        filters, c = self.order - 1, self.channels_local
        if isinstance(self.filter, ExplicitFilter):  # each FIR's window of its last inputs
            state["windows"] = [conv.init_state(batch, device=w.device, dtype=dtype) for conv in self.filter.convs]
        elif self.kind == "implicit":  # the exact O(L) cache: every long-conv input, and the taps
            state["inputs"] = torch.zeros(filters, max_len, batch, c, device=w.device, dtype=dtype)
            with torch.no_grad():
                state["taps"] = at_least_fp32(self.filter(max_len)).flip(-1).contiguous()  # h_{max_len-1} .. h_0
        else:  # the modal recurrence's complex state, as real pairs
            state["modes"] = torch.zeros(filters, batch, c, self.filter.poles.shape[2], 2, device=w.device,
                                         dtype=dtype)
        return state

    def _step_long_conv(self, n: int, z: torch.Tensor, state, pos: int) -> torch.Tensor:  # z [b, c]
        if isinstance(self.filter, ExplicitFilter):
            window = torch.cat([state["windows"][n], z.unsqueeze(-1)], dim=-1)  # [b, c, len]
            state["windows"][n] = window[..., 1:]
            return (window * self.filter.weight(n)).sum(-1)
        if self.kind == "implicit":
            state["inputs"][n, pos] = z
            taps = state["taps"][n, :, state["taps"].shape[-1] - 1 - pos:]  # [c, pos + 1]: h_pos .. h_0
            return torch.einsum("jbc,cj->bc", state["inputs"][n, : pos + 1], taps)
        p, residues = self.filter.modes(n)  # [c, S, 2]
        s = complex_pairs.mul(p, state["modes"][n])  # s_t = p s_{t-1} + z_t
        s = torch.stack([s[..., 0] + z.unsqueeze(-1), s[..., 1]], -1)
        state["modes"][n] = s
        return complex_pairs.mul(residues, s)[..., 0].sum(-1)  # Re(R . s_t)

    def step(self, x: torch.Tensor, state, pos: int) -> torch.Tensor:  # x: [1, b, d]
        p, state["conv"] = self.short_conv.step(self.in_proj(x)[0], state["conv"])
        *gates, v = self._streams(at_least_fp32(p))
        z = gates[0] * v
        for n in range(self.order - 1):
            z = gates[n + 1] * (self._step_long_conv(n, z, state, pos) + self.D[n] * z)
        return self.out_proj(z.to(x.dtype).unsqueeze(0))


def build(c: HyenaConfig, b: Build) -> Hyena:
    return Hyena(c, init_std=b.init_std, out_std=b.out_std, dims=b.dims, kernels=c.kernels)


def check_tensor_parallel(c: HyenaConfig, tp: int) -> str | None:
    """Channels split by whole heads."""
    return divisibility(tp, {"model.num_heads": c.num_heads})


def flops_per_token(c: HyenaConfig, seq_len: int) -> dict[str, float]:
    """``W_in``, ``W_out`` (2 per weight) and the short convs' taps; per channel and long filter the FFT
    convolution: three transforms of ``2s`` points (input, product back; the filter's amortised over the batch)
    at ``~2.5 n log2 n`` real FLOPs each, per token ``~15 log2(2s)``, with the spectra's product, the skip and the
    gates (``~4``); and the first gate ``x^1 v`` (the filter's own parameters are not per token)."""
    d, n = c.d_model, c.hyena_order
    return {"projections": 2.0 * (d * (n + 1) * d + d * d), "short conv": 2.0 * (n + 1) * d * c.hyena_short_kernel,
            "fft conv": (n - 1) * d * (15.0 * math.log2(2 * max(seq_len, 1)) + 4.0), "gate": 2.0 * d}


def explicit_flops(filter_len_of):
    def flops(c: HyenaConfig, seq_len: int) -> dict[str, float]:
        """The projections and short convs, the FIRs' taps (depthwise: 2 FLOPs per tap and channel), gates and
        skip."""
        d, n = c.d_model, c.hyena_order
        return {"projections": 2.0 * (d * (n + 1) * d + d * d),
                "short conv": 2.0 * (n + 1) * d * c.hyena_short_kernel,
                "filter conv": 2.0 * (n - 1) * d * filter_len_of(c), "gates and skip": (n - 1) * 4.0 * d + 2.0 * d}
    return flops


def context_parallel(c: HyenaConfig) -> ContextParallel:
    """The implicit filter reads every earlier input of its long conv; the modal one carries its recurrence's state."""
    return ContextParallel("keys_values" if c.hyena_filter == "implicit" else "state")


def build_short(c: ShortExplicitConfig, b: Build) -> Hyena:
    return Hyena(c, init_std=b.init_std, out_std=b.out_std, dims=b.dims, kind="short",
                 filter_len=c.hyena_short_filter_len, kernels=c.kernels)


def build_medium(c: MediumRegularizedConfig, b: Build) -> Hyena:
    return Hyena(c, init_std=b.init_std, out_std=b.out_std, dims=b.dims, kind="medium",
                 filter_len=c.hyena_medium_filter_len, kernels=c.kernels)


def explicit_halo(c: HyenaConfig, filter_len: int) -> ContextParallel:
    """What output ``t`` reads: the short conv's ``k - 1`` inputs, then each FIR's ``len - 1`` before those."""
    return ContextParallel("halo", halo=(c.hyena_short_kernel - 1) + (c.hyena_order - 1) * (filter_len - 1))


SPECS = (
    SublayerSpec("H", "Hyena operator: gated long convolutions (implicit or modal filter)", HyenaConfig, build,
                 check_tensor_parallel, context_parallel, flops_per_token=flops_per_token),
    SublayerSpec("X", "Hyena with a short explicit filter (StripedHyena 2 hyena_se)", ShortExplicitConfig,
                 build_short, check_tensor_parallel, lambda c: explicit_halo(c, c.hyena_short_filter_len),
                 flops_per_token=explicit_flops(lambda c: c.hyena_short_filter_len)),
    SublayerSpec("D", "Hyena with a medium regularised explicit filter (StripedHyena 2 hyena_mr)",
                 MediumRegularizedConfig, build_medium, check_tensor_parallel,
                 lambda c: explicit_halo(c, c.hyena_medium_filter_len),
                 flops_per_token=explicit_flops(lambda c: c.hyena_medium_filter_len)),
)
