"""Sliding-window attention in blocks vs with the dense mask: time and peak memory of forward + backward over
sequence length, at one window; or, with ``--document-length N``, global causal attention over documents of ``N``
tokens packed into each sequence (the dense path's mask: causal and the same document; the blocked path: a window
of ``N``, the documents' reach, with the documents' ids, as ``Attention`` runs packed documents); or, with
``--causal``, global causal attention with its ``[s, s]`` mask against SDPA's ``is_causal`` (no mask), as
``Attention`` runs one document per row.

    .venv/bin/python benchmarks/sliding_window.py [--window 1024] [--lengths 2048,4096,8192,16384] [--heads 8]
        [--head-dim 64] [--batch 1] [--steps 3] [--document-length N | --causal]

Both paths compute ``softmax(q k^T / sqrt(d) + M) v`` for the window's mask ``M`` through torch's SDPA: ``dense``
builds ``M`` as one ``[s, s]`` boolean mask (what local attention did before), ``blocks`` is
``chimera.models.mixers.attention.sliding_window_attention`` (queries in blocks of ``window``, each against the
``2 window - 1`` keys it can reach). Each (path, length) runs in a fresh process: peak memory is its resident-set
high-water mark minus the same process's before the first step (the inputs included, the interpreter not). Time:
the median of ``steps`` forward + backward passes after one warm-up. fp32, random inputs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import statistics
import time
from datetime import date

import torch
import torch.nn.functional as F

from chimera.models.mixers.attention import sliding_window_attention


def dense(q, k, v, window: int, seg: torch.Tensor | None = None) -> torch.Tensor:
    pos = torch.arange(q.shape[2])
    diff = pos[:, None] - pos[None, :]
    if seg is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(diff >= 0) & (diff < window))
    mask = (diff >= 0) & (seg[:, :, None] == seg[:, None, :])  # [b, s, s]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))


def blocks(q, k, v, window: int, seg: torch.Tensor | None = None) -> torch.Tensor:
    return sliding_window_attention(q, k, v, window, q_seg=seg, k_seg=seg)


def causal(q, k, v, window: int, seg: torch.Tensor | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def measure(path: str, s: int, args, out) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, s, args.head_dim, generator=g).requires_grad_() for _ in range(3))
    attend = dense if path == "dense" else causal if args.causal else blocks
    seg, window = None, s if args.causal else args.window
    if args.document_length:  # documents of document_length tokens, packed
        seg, window = (torch.arange(s) // args.document_length).expand(args.batch, s), args.document_length
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        attend(q, k, v, window, seg).sum().backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
    out.put((statistics.median(times[1:]), peak / 2**20))


def run(path: str, s: int, args) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=measure, args=(path, s, args, out))
    proc.start()
    result = out.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--lengths", default="2048,4096,8192,16384")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--document-length", type=int, default=0,
                        help="global attention over packed documents of this many tokens (instead of a window)")
    parser.add_argument("--causal", action="store_true",
                        help="global causal attention: the dense causal mask against SDPA's is_causal")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    print(f"# {date.today()} | {platform.processor() or platform.machine()} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | "
          + ("global causal attention" if args.causal else f"global attention, documents of {args.document_length}"
             if args.document_length else f"window {args.window}") + f", {args.batch} x {args.heads} heads x "
          f"{args.head_dim}, fp32, forward + backward")
    fast = "is_causal" if args.causal else "blocks"
    print(f"| length | dense ms | {fast} ms | speed-up | dense peak GiB | {fast} peak GiB | memory ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for s in lengths:
        (t_d, m_d), (t_b, m_b) = run("dense", s, args), run("blocks", s, args)
        print(f"| {s:,} | {t_d * 1e3:,.0f} | {t_b * 1e3:,.0f} | {t_d / t_b:.2f}x | {m_d:.2f} | {m_b:.2f} | "
              f"{m_d / max(m_b, 1e-9):.1f}x |", flush=True)


if __name__ == "__main__":
    main()
