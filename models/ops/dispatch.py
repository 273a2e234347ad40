"""One dispatch point per hot operation: the reference math, its Triton kernel, or its CPU fast path.

``model.kernels`` chooses (``chimera.models.spec.ModelFields``):

* ``reference``: the readable math where it lives (``chimera.models.scan``, the mixers, ``chimera.models.conv``);
* ``triton``: the kernels of ``chimera.models.ops.<op>`` (the linear scan, Mamba-1's selective scan fused with its
  discretisation and read-out, the short conv, RMSNorm, RoPE, Hyena's gate and skip after its long convolution, and
  within chunks Mamba-2's SSD, Based's linear attention and RWKV-6's WKV). On a CUDA tensor they need ``triton``
  importable; on a CPU tensor they run in Triton's interpreter, which only ``TRITON_INTERPRET=1`` (set before
  ``triton`` is first imported) turns on — the tests' way of holding the kernels to the reference without a GPU;
* ``auto``: on CUDA tensors, when ``triton`` imports, the kernels that have been checked on a GPU against their
  reference (``benchmarks/gpu_fast_paths.py``'s check: the linear scan and the short conv), else the reference. The
  others (the selective scan, SSD, Based, RWKV-6, Hyena's gate, RMSNorm, RoPE) are held to their references only in the
  interpreter so far and run only with ``triton``, until a device check has run them (``checked_on_gpu``). On CPU
  ``auto`` takes the CPU's fast paths where they exist (``cpu_fast_path``): the reference's math with the backward
  written out and fewer passes over memory — the short conv as shifted multiply-adds (``conv.depthwise_taps``),
  Mamba-2's SSD (``chimera.models.ops.ssd_cpu``), the RG-LRU's gates and scan (``chimera.models.ops.rglru_cpu``) and
  RMSNorm, plain or gated (``chimera.models.ops.rmsnorm_cpu``) — except while ``torch.export`` or ``torch.compile``
  traces; the Triton kernels run on CPU only in the interpreter, for tests. Figures: ``benchmarks/RESULTS.md``.

Every function here takes the reference's arguments plus ``kernels`` and returns what the reference returns.
"""

from __future__ import annotations

import functools
import os

import torch

from chimera.errors import UserError
from chimera.models import conv, scan
from chimera.parallel.dims import SINGLE_PROCESS, ParallelDims


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def tracing() -> bool:
    """Whether ``torch.export`` or ``torch.compile`` is tracing: then the reference paths, which they can follow (the
    CPU paths' hand-written backward functions and data-dependent shortcuts they cannot)."""
    return torch.compiler.is_exporting() or torch.compiler.is_compiling()


def cpu_fast_path(kernels: str, device: torch.device) -> bool:
    """Whether ``kernels`` takes CPU's fast path (the same math with the backward by hand) for tensors on ``device``."""
    return kernels == "auto" and device.type == "cpu" and not tracing()


def use_triton(kernels: str, device: torch.device, checked_on_gpu: bool = True) -> bool:
    """Whether ``kernels`` runs the Triton kernel for tensors on ``device`` (a ``UserError`` where it cannot);
    ``checked_on_gpu``: whether the kernel has been held to its reference on a GPU, without which ``auto`` does not
    take it."""
    if kernels == "reference":
        return False
    if kernels == "auto":
        return checked_on_gpu and device.type == "cuda" and triton_importable()
    if kernels != "triton":
        raise ValueError(f"kernels={kernels!r}: expected auto, reference or triton")
    if not triton_importable():
        raise UserError("model.kernels=triton but triton is not installed; install the `kernels` extra "
                        "(pip install 'chimera[kernels]') or set model.kernels=auto")
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return True
    raise UserError(f"model.kernels=triton needs a CUDA device (the tensors are on {device.type}); set "
                    "model.kernels=auto (or reference), or TRITON_INTERPRET=1 to run the kernels in Triton's "
                    "interpreter (slow; for tests)")


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, *,
                kernels: str = "auto") -> torch.Tensor:
    """``chimera.models.scan.linear_scan``: all ``h_t = a_t h_{t-1} + b_t`` along dim 0 (real or complex)."""
    if use_triton(kernels, a.device):
        from chimera.models.ops import scan as triton_scan

        return triton_scan.linear_scan(a, b, h0)
    if a.is_complex() or b.is_complex():
        return scan.HillisSteele.states(a, b) if h0 is None else scan.linear_recurrence_loop(a, b, h0)
    return scan.linear_scan(a, b, h0)


def scan_with(kernels: str):
    """``linear_scan`` with ``kernels`` bound: the scan function ``linear_scan_across`` takes."""
    return functools.partial(linear_scan, kernels=kernels)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  segments: torch.Tensor | None = None, *, kernels: str = "auto") -> torch.Tensor:
    """The causal depthwise conv of ``x [k-1+s, b, c]`` (the ``k - 1`` inputs before the sequence in front) with
    ``weight [c, k]`` -> ``[s, b, c]``; ``segments [k-1+s, b]``: packed documents' ids, no tap crossing one
    (``chimera.models.conv.depthwise_valid``, ``depthwise_valid_within_segments``). On CPU ``auto`` takes the same sums
    as shifted multiply-adds with their backward written out (``chimera.models.conv.depthwise_taps``) for short
    kernels (up to ``conv.TAPS_MAX_KERNEL`` taps; longer ones, Hyena's explicit filters, run torch's conv faster)."""
    if use_triton(kernels, x.device):
        from chimera.models.ops import short_conv

        return short_conv.depthwise_conv(x, weight, bias, segments)
    if cpu_fast_path(kernels, x.device) and weight.shape[1] <= conv.TAPS_MAX_KERNEL:
        return conv.depthwise_taps(x, weight, bias, segments)
    if segments is None:
        return conv.depthwise_valid(x, weight, bias)
    return conv.depthwise_valid_within_segments(x, weight, bias, segments)


def ssd_within_chunks(C: torch.Tensor, B: torch.Tensor, xdt: torch.Tensor, log_a: torch.Tensor, *,
                      kernels: str = "auto") -> torch.Tensor:
    """``chimera.models.mixers.mamba2.within_chunks``: Mamba-2's SSD inside each chunk (``C, B [..., q, n]``,
    broadcast against ``xdt [..., q, p]``, ``log_a [..., q]``, ``-inf`` at a document's start) -> ``y [..., q, p]``.

    ``auto`` runs the reference here, also on CUDA: the first kernel held a whole chunk in one program, and on an H200
    at Mamba-2's chunk of 256 (state 128) it did not finish its first check within minutes (``benchmarks/RESULTS.md``,
    fast paths). The kernel is now tiled within the chunk (``chimera.models.ops.ssd.BLOCK`` positions a tile) but has
    not run on a GPU yet. ``triton`` runs it. On CPU ``auto`` takes the reference's math with its backward written out
    (``chimera.models.ops.ssd_cpu``)."""
    if use_triton(kernels, xdt.device, checked_on_gpu=False):
        from chimera.models.ops import ssd

        heads = (*xdt.shape[:-2], *C.shape[-2:])  # the kernel takes a C, B per head
        return ssd.within_chunks(C.expand(heads), B.expand(heads), xdt, log_a)
    from chimera.models.mixers import mamba2  # imports this module

    if cpu_fast_path(kernels, xdt.device):
        from chimera.models.ops import ssd_cpu

        return ssd_cpu.within_chunks(C, B, xdt, log_a)
    return mamba2.within_chunks(C, B, xdt, log_a)


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int,
        reset: torch.Tensor | None = None, dims: ParallelDims = SINGLE_PROCESS, kernels: str = "auto",
        D: torch.Tensor | None = None) -> torch.Tensor:
    """``chimera.models.mixers.mamba2.ssd``: Mamba-2's chunked scan, ``y [s, b, h, p]`` (with the skip ``D x`` where
    ``D`` is given). On CPU without context parallelism ``auto`` takes its four steps and the skip as one function with
    the backward by hand (``chimera.models.ops.ssd_cpu``); otherwise the reference, whose step 1 and scan dispatch
    again (``ssd_within_chunks``, ``linear_scan``)."""
    from chimera.models.mixers import mamba2  # imports this module

    if cpu_fast_path(kernels, x.device) and dims.cp == 1:
        from chimera.models.ops import ssd_cpu

        return ssd_cpu.ssd(x, dt, A, B, C, chunk_size, reset, D)
    return mamba2.ssd(x, dt, A, B, C, chunk_size, reset, dims, kernels, D)


def rglru_states(gate_a: torch.Tensor, gate_x: torch.Tensor, u: torch.Tensor, a_param: torch.Tensor,
                 reset: torch.Tensor, reset_unnormalized: bool, dims: ParallelDims = SINGLE_PROCESS, *,
                 kernels: str = "auto") -> torch.Tensor:
    """``chimera.models.mixers.rglru.states``: the RG-LRU's gates and recurrence, every ``h_t [s, b, w]`` from the
    gates' pre-activations. On CPU without context parallelism ``auto`` takes them as one function with the backward
    by hand (``chimera.models.ops.rglru_cpu``); otherwise the reference, whose scan dispatches (``linear_scan``)."""
    from chimera.models.mixers import rglru  # imports this module

    if cpu_fast_path(kernels, u.device) and dims.cp == 1:
        from chimera.models.ops import rglru_cpu

        return rglru_cpu.states(gate_a, gate_x, u, a_param, reset, reset_unnormalized)
    return rglru.states(gate_a, gate_x, u, a_param, reset, reset_unnormalized, dims, kernels)


def based_within_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document: torch.Tensor | None, *,
                        kernels: str = "auto") -> torch.Tensor:
    """``chimera.models.mixers.based.within_chunks``: Based's quadratic form inside each chunk (``q, k [..., l, f]``,
    ``v [..., l, e]``, ``document``: each position's document index in its chunk, or None)."""
    if use_triton(kernels, v.device, checked_on_gpu=False):
        from chimera.models.ops import based

        return based.within_chunks(q, k, v, document)
    from chimera.models.mixers import based  # imports this module

    return based.within_chunks(q, k, v, document)


def rwkv6_within_chunks(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, before: torch.Tensor, cum: torch.Tensor,
                        document: torch.Tensor | None, *, kernels: str = "auto") -> torch.Tensor:
    """``chimera.models.mixers.rwkv6.within_chunks``: RWKV-6's WKV inside each chunk, without the bonus (``r, k,
    before, cum [..., q, n]``, ``v [..., q, m]``, ``document``: each position's document index in its chunk, or
    None)."""
    if use_triton(kernels, v.device, checked_on_gpu=False):
        from chimera.models.ops import rwkv6

        return rwkv6.within_chunks(r, k, v, before, cum, document)
    from chimera.models.mixers import rwkv6  # imports this module

    return rwkv6.within_chunks(r, k, v, before, cum, document)


def hyena_gate_with_skip(g: torch.Tensor, y: torch.Tensor, z: torch.Tensor, D: torch.Tensor, *,
                         kernels: str = "auto") -> torch.Tensor:
    """``chimera.models.mixers.hyena.gate_with_skip``: ``g * (y + D z)`` after the long convolution ``y = h (*) z``
    (``g, y, z [s, b, c]``, ``D [c]``)."""
    if use_triton(kernels, z.device, checked_on_gpu=False):
        from chimera.models.ops import hyena

        return hyena.gate_with_skip(g, y, z, D)
    from chimera.models.mixers import hyena  # imports this module

    return hyena.gate_with_skip(g, y, z, D)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool = False, *,
             kernels: str = "auto") -> torch.Tensor:
    """``chimera.models.norms.rms_norm``: ``x / sqrt(mean(x^2) + eps) * w`` (``1 + w`` with ``offset``) over the last
    dim, in fp32, returned in ``x``'s dtype. On CPU ``auto`` takes it with the backward by hand
    (``chimera.models.ops.rmsnorm_cpu``, which Mamba-2's gated norm takes too)."""
    if use_triton(kernels, x.device, checked_on_gpu=False):
        from chimera.models.ops import rmsnorm

        return rmsnorm.rms_norm(x, weight, eps, offset)
    if cpu_fast_path(kernels, x.device):
        from chimera.models.ops import rmsnorm_cpu

        return rmsnorm_cpu.rms_norm(x, weight, eps, offset)
    from chimera.models import norms  # imports this module

    return norms.rms_norm(x, weight, eps, offset)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, kernels: str = "auto") -> torch.Tensor:
    """``chimera.models.mixers.attention.apply_rope``: the first ``rot`` dims of ``x [b, h, s, d]`` turned pairwise by
    the tables' angles (``[s, rot/2]`` or ``[b, 1, s, rot/2]``), the rest passed through."""
    if cos.shape[-1] and use_triton(kernels, x.device, checked_on_gpu=False):
        from chimera.models.ops import rope

        return rope.apply_rope(x, cos, sin)
    from chimera.models.mixers import attention  # imports this module

    return attention.apply_rope(x, cos, sin)


def selective_scan(dt: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   reset: torch.Tensor | None = None, *, dims: ParallelDims = SINGLE_PROCESS, kernels: str = "auto"):
    """``chimera.models.mixers.mamba.selective_scan``: Mamba-1's discretisation, scan and read-out -> (``y [s, b, H,
    P]``, the last state). The fused kernel without context parallelism; under it, the reference with the scan's
    kernel (``linear_scan``), whose states ``linear_scan_across`` carries between ranks."""
    from chimera.models.mixers import mamba  # imports this module

    if dims.cp == 1 and use_triton(kernels, x.device, checked_on_gpu=False):
        from chimera.models.ops import selective_scan as fused

        return fused.selective_scan(dt, x, A, B, C, reset)
    return mamba.selective_scan(dt, x, A, B, C, reset, scan_with(kernels), dims)
