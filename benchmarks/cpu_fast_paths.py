"""CPU's fast paths, one op at a time: forward + backward of each op through its reference (autograd over the
readable math, ``model.kernels=reference``) and through what ``model.kernels=auto`` runs on CPU
(``chimera.models.ops.dispatch``), at the shapes of the small benchmark models' training step
(``benchmarks/hf_step_time.py``: batch 8 x 256 tokens). The two alternate run by run (median of ``--runs``); the
last column is their outputs' largest difference.

    .venv/bin/python benchmarks/cpu_fast_paths.py [--runs 15]

Ops: the RG-LRU's gates and scan (RecurrentGemma small's width 256), RMSNorm (width 256) and Mamba-2's gated RMSNorm
(width 512, one group), the short conv (4 taps, width 512), Mamba-2's SSD (16 heads of 32, state 64, chunk 64) and
grouped-query attention (4 query heads over 1 kv head of 64, causal): SDPA over a gathered copy of the kv head per
query head (the reference) against SDPA's ``enable_gqa``. Single ops on buffers that stay warm between runs: inside a
step, where buffers are freshly faulted in, the gains are smaller (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import torch
import torch.nn.functional as F

from chimera.models import norms
from chimera.models.mixers import mamba2, rglru
from chimera.models.ops import dispatch
from chimera.parallel.dims import SINGLE_PROCESS

S, B = 256, 8


def cases(gen: torch.Generator):
    """(name, shape text, inputs, reference(*inputs), fast(*inputs))."""
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_()

    reset = torch.zeros(S, B, dtype=torch.bool)
    reset[0] = True
    w = 256
    yield ("RG-LRU gates + scan", f"[{S}, {B}, {w}]", [randn(S, B, w), randn(S, B, w), randn(S, B, w), randn(w)],
           lambda *t: rglru.states(*t, reset, True, SINGLE_PROCESS, kernels="reference"),
           lambda *t: dispatch.rglru_states(*t, reset, True, kernels="auto"))
    yield ("RMSNorm (1 + w)", f"[{S}, {B}, {w}]", [randn(S, B, w), randn(w, scale=0.1)],
           lambda x, g: norms.rms_norm(x, g, 1e-6, True),
           lambda x, g: dispatch.rms_norm(x, g, 1e-6, True, kernels="auto"))
    mixer = mamba2.Mamba2Mixer(256, d_state=64, head_dim=32, init_std=0.02, out_std=0.02, dims=SINGLE_PROCESS)
    mixer.norm_weight.data.fill_(1.0)
    reference_mixer = mamba2.Mamba2Mixer(256, d_state=64, head_dim=32, init_std=0.02, out_std=0.02,
                                         dims=SINGLE_PROCESS, kernels="reference")
    reference_mixer.norm_weight.data.fill_(1.0)
    yield ("Mamba-2 gated RMSNorm", f"[{S}, {B}, 512]", [randn(S, B, 512), randn(S, B, 512)],
           reference_mixer._gated_norm, mixer._gated_norm)
    yield ("short conv, 4 taps", f"[{S + 3}, {B}, 512]", [randn(S + 3, B, 512), randn(512, 4), randn(512)],
           lambda *t: dispatch.causal_conv1d(*t, kernels="reference"),
           lambda *t: dispatch.causal_conv1d(*t, kernels="auto"))
    h = 16
    ssd_inputs = [randn(S, B, h, 32), (0.05 + 0.5 * torch.rand(S, B, h, generator=gen)).requires_grad_(),
                  (-torch.rand(h, generator=gen) - 0.2).requires_grad_(), randn(S, B, 1, 64), randn(S, B, 1, 64)]
    yield ("Mamba-2 SSD", f"[{S}, {B}, {h} x 32], state 64", ssd_inputs,
           lambda *t: mamba2.ssd(*t, 64, kernels="reference"), lambda *t: dispatch.ssd(*t, 64, kernels="auto"))
    heads = torch.zeros(4, dtype=torch.long)
    yield ("attention, 4 heads over 1 kv head", f"[{B}, 4, {S}, 64]",
           [randn(B, 4, S, 64), randn(B, 1, S, 64), randn(B, 1, S, 64)],
           lambda q, k, v: F.scaled_dot_product_attention(q, k[:, heads], v[:, heads], is_causal=True),
           lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


def forward_backward(fn, inputs, grad_out):
    out = fn(*inputs)
    torch.autograd.backward(out, grad_out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    print(f"# {date.today()} | {platform.machine()} | torch {torch.__version__} | threads {torch.get_num_threads()}"
          f" | fp32, forward + backward, median of {args.runs} alternating runs")
    print("| op | shape | reference ms | CPU fast path ms | speed-up | max abs diff |")
    print("|---|---|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for name, shape, inputs, reference, fast in cases(gen):
        with torch.no_grad():
            want, got = reference(*inputs), fast(*inputs)
        grad_out = torch.randn(want.shape, generator=gen)
        diff = (got - want).abs().max().item()
        times = {reference: [], fast: []}
        for _ in range(args.runs + 1):  # the first of each: warm-up
            for fn in (reference, fast):
                start = time.perf_counter()
                forward_backward(fn, inputs, grad_out)
                times[fn].append(time.perf_counter() - start)
                for t in inputs:
                    t.grad = None
        t_ref, t_fast = (statistics.median(times[fn][1:]) * 1e3 for fn in (reference, fast))
        print(f"| {name} | {shape} | {t_ref:.2f} | {t_fast:.2f} | {t_ref / t_fast:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
