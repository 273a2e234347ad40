"""The fast paths on a GPU: kernels against their references (correctness, then speed) and whole ~1B models' MFU.

    python benchmarks/gpu_fast_paths.py [--out DIR] [--sections copy,matmul,check,scan,ssd,conv,models]
    python benchmarks/gpu_fast_paths.py --tiny        # the same code at toy sizes (CPU: references only)

One run measures, in this order (each section on its own: an error is printed and the next one runs):

* ``copy``: the device's memory bandwidth, a large device-to-device copy (bytes read + bytes written over the
  median time): the ceiling the scans are compared with;
* ``matmul``: a large bf16 matrix product (the measured compute ceiling, beside the datasheet peak MFU uses);
* ``check``: every Triton kernel (``chimera.models.ops``) against the reference math on fresh random inputs at
  sizes that do not divide the kernels' tiles: outputs and input gradients, ``|fast - ref| / |ref|`` against a
  float64 reference;
* ``scan`` / ``ssd`` / ``conv``: time of the kernel and of the reference path on the same tensors (forward, and
  forward + backward); the scan's bytes (read ``a`` and ``b``, write ``h``: 3 x T x C elements) over its time,
  as a fraction of ``copy``;
* ``models``: a ~1B Griffin (``R-R-L-``, width 2048) and a ~1B Mamba-2 hybrid (``M-`` with global attention
  every eighth mixer, width 2048) at sequence length 4096, bf16 weights, fused AdamW, a whole training step
  (forward, backward, optimizer) with ``kernels=triton`` and ``kernels=reference``: tokens/s, model TFLOP/s
  (``chimera.models.flops``) and MFU against the datasheet bf16 peak (``chimera.trainer.device_peak``).

Times are medians of CUDA-event timings (``triton.testing.do_bench``) for kernels, of synchronised wall clock
for training steps. Results go to ``DIR/gpu_fast_paths.json``; a table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
from datetime import date
from pathlib import Path

import torch

from chimera.configs.loader import load_model_config
from chimera.models import conv, norms, scan
from chimera.models.causal_lm import build_model
from chimera.models.flops import model_flops_per_token
from chimera.models.mixers import attention, based, hyena, mamba, mamba2
from chimera.models.mixers.attention import Rope
from chimera.models.ops import dispatch
from chimera.trainer.device_peak import peak_flops

RESULTS: dict = {}
LINES: list[str] = []


def say(line: str) -> None:
    print(line, flush=True)
    LINES.append(line)


def median_ms(fn, device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[1]


def rel_err(fast: torch.Tensor, ref: torch.Tensor) -> float:
    fast, ref = fast.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(fast).all():
        return math.inf
    return ((fast - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# ---- ceilings ------------------------------------------------------------------------------------------

def copy_bandwidth(device, tiny: bool) -> None:
    n = (1 << 16) if tiny else (1 << 30)  # 4 GiB of fp32 each way on the GPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    gbs = 2 * src.numel() * 4 / ms / 1e6
    RESULTS["copy_GBps"] = gbs
    say(f"copy: {2 * n * 4 / 2**30:.1f} GiB moved in {ms:.3f} ms = {gbs:,.0f} GB/s")


def matmul_peak(device, tiny: bool) -> None:
    n = 256 if tiny else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device)
    tflops = 2 * n**3 / ms / 1e9
    RESULTS["matmul_TFLOPs"] = tflops
    datasheet = peak_flops(device, "bf16")
    RESULTS["datasheet_bf16_TFLOPs"] = datasheet.flops_per_s / 1e12
    say(f"matmul {n}^3 {str(dtype)[6:]}: {tflops:,.0f} TFLOP/s measured; peak used for MFU: "
        f"{datasheet.flops_per_s / 1e12:,.0f} TFLOP/s ({datasheet.source})")


# ---- correctness on the device ---------------------------------------------------------------------------

def check_kernels(device, tiny: bool) -> None:
    if "triton" not in kernel_choices(device):
        say("check: skipped off CUDA (the CPU tests hold the kernels under TRITON_INTERPRET=1)")
        return
    g = torch.Generator(device="cpu").manual_seed(int(time.time()))
    rows = {}

    def rand(*shape, lo=None):
        t = torch.rand(*shape, generator=g, dtype=torch.float64) if lo is not None else \
            torch.randn(*shape, generator=g, dtype=torch.float64)
        return t * (1 - lo) + lo if lo is not None else t

    def compare(name, fast_fn, ref_fn, inputs):
        leaves_f = [t.to(device, torch.float32).requires_grad_() for t in inputs]
        leaves_r = [t.clone().requires_grad_() for t in inputs]
        out_f, out_r = fast_fn(*leaves_f), ref_fn(*leaves_r)
        cot = torch.randn(out_r.shape, generator=g, dtype=torch.float64)
        (out_f * cot.to(device, out_f.dtype)).sum().backward()
        (out_r * cot).sum().backward()
        errs = [rel_err(out_f, out_r)] + [rel_err(f.grad, r.grad) for f, r in zip(leaves_f, leaves_r, strict=True)]
        rows[name] = errs
        say(f"check {name}: forward {errs[0]:.1e}, gradients " + ", ".join(f"{e:.1e}" for e in errs[1:]))

    T, C = 1003, 3 * 1000 + 7  # neither divides a tile
    compare("linear_scan fp32", lambda a, b: dispatch.linear_scan(a, b, kernels="triton"),
            lambda a, b: scan.linear_recurrence_loop(a, b) if tiny else scan.linear_scan(a, b),
            [rand(T, C, lo=0.5), rand(T, C)])
    s, b, c, k = 1001, 2, 769, 4
    compare("causal_conv1d fp32", lambda x, w: dispatch.causal_conv1d(x, w, None, kernels="triton"),
            lambda x, w: conv.depthwise_valid(x, w, None), [rand(k - 1 + s, b, c), rand(c, k)])
    rows_, d = 4099, 2 * 2048 + 3  # the kernels auto does not take yet (no device check): first the small ones
    compare("rms_norm fp32", lambda x, w: dispatch.rms_norm(x, w, 1e-6, kernels="triton"),
            lambda x, w: norms.rms_norm(x, w, 1e-6), [rand(rows_, d), rand(d)])
    rope_tables = Rope(96, 10000.0).tables(torch.randint(0, 8192, (2, 1, 1001), generator=g))  # 96 of 128 dims
    on_device = [t.to(device) for t in rope_tables]
    compare("apply_rope fp32", lambda x: dispatch.apply_rope(x, *on_device, kernels="triton"),
            lambda x: attention.apply_rope(x, *rope_tables), [rand(2, 6, 1001, 128)])
    compare("selective_scan fp32",  # Mamba-1's, fused: 769 channels (not a multiple of 32), state 16, one head
            lambda dt, x_, A, B_, C_: dispatch.selective_scan(dt, x_, A, B_, C_, kernels="triton")[0],
            lambda dt, x_, A, B_, C_: mamba.selective_scan(dt, x_, A, B_, C_)[0],
            [rand(s, b, 1, c, lo=0.0) * 0.1, rand(s, b, 1, c), -rand(1, c, 16, lo=0.1), rand(s, b, 1, 16),
             rand(s, b, 1, 16)])
    compare("hyena_gate_with_skip fp32",
            lambda g_, y, z, D: dispatch.hyena_gate_with_skip(g_, y, z, D, kernels="triton"),
            lambda g_, y, z, D: hyena.gate_with_skip(g_, y, z, D),
            [rand(s, b, c), rand(s, b, c), rand(s, b, c), rand(c)])
    compare("based_within_chunks fp32", lambda q_, k_, v_: dispatch.based_within_chunks(q_, k_, v_, None,
                                                                                         kernels="triton"),
            lambda q_, k_, v_: based.within_chunks(q_, k_, v_, None),
            [rand(2, 4, 9, 64, 16), rand(2, 4, 9, 64, 16), rand(2, 4, 9, 64, 64)])
    q, n, p = 256, 128, 64
    shape = (2, 3, 5)
    log_a = -rand(*shape, q, lo=0.0) * 0.1
    compare("ssd_within_chunks fp32",
            lambda C_, B_, x_, la: dispatch.ssd_within_chunks(C_, B_, x_, la, kernels="triton"),
            lambda C_, B_, x_, la: mamba2.within_chunks(C_, B_, x_, la),
            [rand(*shape, q, n), rand(*shape, q, n), rand(*shape, q, p), log_a])
    RESULTS["check_rel_err"] = rows


# ---- kernel speed --------------------------------------------------------------------------------------

def kernel_choices(device) -> list[str]:
    """The Triton kernels and the reference on CUDA (or on CPU under ``TRITON_INTERPRET=1``: a dry run)."""
    return ["triton", "reference"] if device.type == "cuda" or dispatch.interpreting() else ["reference"]


def fwd_bwd(fn, inputs):
    def run():
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
    return run


def time_pair(name, device, make_inputs, call, bytes_moved=None, flops=None) -> None:
    rows = {}
    for kernels in kernel_choices(device):
        inputs = make_inputs()
        fwd = median_ms(lambda inputs=inputs, kernels=kernels: call(*inputs, kernels=kernels), device)
        leaves = [t.requires_grad_() if t.is_floating_point() else t for t in make_inputs()]
        both = median_ms(fwd_bwd(lambda *t, kernels=kernels: call(*t, kernels=kernels), leaves), device)
        row = {"forward_ms": fwd, "forward_backward_ms": both}
        extra = ""
        if bytes_moved:
            row["forward_GBps"] = bytes_moved / fwd / 1e6
            if "copy_GBps" in RESULTS:
                row["of_copy"] = row["forward_GBps"] / RESULTS["copy_GBps"]
            extra = f", {row['forward_GBps']:,.0f} GB/s" + (f" = {row['of_copy']:.0%} of copy" if "of_copy" in row
                                                             else "")
        if flops:
            row["forward_TFLOPs"] = flops / fwd / 1e9
            extra += f", {row['forward_TFLOPs']:,.1f} TFLOP/s"
        rows[kernels] = row
        say(f"{name} [{kernels}]: forward {fwd:.3f} ms{extra}; forward+backward {both:.3f} ms")
        del inputs, leaves
        torch.cuda.empty_cache() if device.type == "cuda" else None
    if "triton" in rows:
        ref, fast = rows["reference"], rows["triton"]
        say(f"{name}: triton / reference speed-up {ref['forward_ms'] / fast['forward_ms']:.2f}x forward, "
            f"{ref['forward_backward_ms'] / fast['forward_backward_ms']:.2f}x forward+backward")
    RESULTS[name] = rows


def bench_scan(device, tiny: bool) -> None:
    for dtype in (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,):
        T, C = (64, 256) if tiny else (4096, 8 * 2560)  # a 4k sequence x 8 rows x RG-LRU width 2560
        size = torch.finfo(dtype).bits // 8

        def make(T=T, C=C, dtype=dtype):
            return [(torch.rand(T, C, device=device) * 0.5 + 0.5).to(dtype), torch.randn(T, C, device=device,
                                                                                         dtype=dtype)]
        time_pair(f"linear_scan T={T} C={C} {str(dtype)[6:]}", device, make,
                  lambda a, b, kernels: dispatch.linear_scan(a, b, kernels=kernels), bytes_moved=3 * T * C * size)


def bench_ssd(device, tiny: bool) -> None:
    b, h, c, q, n, p = (1, 2, 2, 16, 8, 8) if tiny else (4, 32, 16, 256, 128, 64)  # seq 4096 in chunks of 256
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def make():
        return [torch.randn(b, h, c, q, n, device=device, dtype=dtype) * 0.3,
                torch.randn(b, h, c, q, n, device=device, dtype=dtype) * 0.3,
                torch.randn(b, h, c, q, p, device=device, dtype=dtype),
                -torch.rand(b, h, c, q, device=device, dtype=dtype) * 0.05]
    flops = b * h * c * (2 * q * q * n + 2 * q * q * p)
    time_pair(f"ssd_within_chunks b={b} h={h} chunks={c}x{q} n={n} p={p} {str(dtype)[6:]}", device, make,
              lambda C_, B_, x_, la, kernels: dispatch.ssd_within_chunks(C_, B_, x_, la, kernels=kernels),
              flops=flops)


def bench_conv(device, tiny: bool) -> None:
    s, b, c, k = (64, 2, 32, 4) if tiny else (4096, 8, 2 * 2048 + 2 * 128, 4)  # Mamba-2's xBC conv at width 2048
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def make():
        return [torch.randn(k - 1 + s, b, c, device=device, dtype=dtype), torch.randn(c, k, device=device, dtype=dtype)]
    time_pair(f"causal_conv1d s={s} b={b} c={c} k={k} {str(dtype)[6:]}", device, make,
              lambda x, w, kernels: dispatch.causal_conv1d(x, w, None, kernels=kernels),
              bytes_moved=2 * s * b * c * (torch.finfo(dtype).bits // 8))


# ---- whole models --------------------------------------------------------------------------------------

MODELS = {
    # ~1B Griffin: 12 RG-LRU + 6 local-MQA blocks of width 2048, gated MLPs 3x, window 2048
    "griffin-1b": ["pattern=R-R-L-", "num_layers=36", "d_model=2048", "num_heads=8", "num_kv_heads=1",
                   "head_dim=256", "mlp_hidden=6144", "window=2048", "vocab_size=32000"],
    # ~1B Mamba-2 hybrid: 14 Mamba-2 (heads of 64, state 128, chunks of 256) + 2 global-attention mixers of
    # width 2048, each followed by a gated MLP
    "mamba2-hybrid-1b": ["pattern=M-M-M-M-M-M-M-*-", "num_layers=32", "d_model=2048", "num_heads=16",
                         "num_kv_heads=4", "head_dim=128", "mlp_hidden=5632", "vocab_size=32000", "ssm_state=128",
                         "ssm_head_dim=64", "ssm_expand=2", "ssm_chunk=256", "conv_kernel=4"],
}
TINY = ["d_model=64", "num_heads=2", "num_kv_heads=1", "head_dim=32", "mlp_hidden=128", "vocab_size=256",
        "window=16", "ssm_state=8", "ssm_head_dim=16", "ssm_chunk=16"]
TINY_MODELS = {"griffin-1b": ["pattern=R-R-L-", "num_layers=6", *TINY],
               "mamba2-hybrid-1b": ["pattern=M-M-M-*-", "num_layers=8", *TINY]}
BASE = "griffin-small"  # no HF family: any pattern


def bench_models(device, tiny: bool, seq_len: int, batch: int, steps: int) -> None:
    rows = {}
    peak = peak_flops(device, "bf16")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name, overrides in (TINY_MODELS if tiny else MODELS).items():
        for kernels in kernel_choices(device):
            try:
                cfg = load_model_config(BASE, [*overrides, f"kernels={kernels}"])
                model = build_model(cfg, seed=0, device=device).to(dtype).train()
                params = sum(p.numel() for p in model.parameters())
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
                ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)

                def step(model=model, opt=opt, ids=ids):
                    loss = model(ids[:, :-1], ids[:, 1:])
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    return loss
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                for _ in range(2):
                    step()
                sync(device)
                times = []
                for _ in range(steps):
                    t = time.perf_counter()
                    loss = step()
                    sync(device)
                    times.append(time.perf_counter() - t)
                seconds = sorted(times)[len(times) // 2]
                tokens_s = batch * seq_len / seconds
                tflops = model_flops_per_token(cfg, seq_len) * tokens_s / 1e12
                row = {"params": params, "seq_len": seq_len, "batch": batch, "step_s": seconds,
                       "tokens_per_s": tokens_s, "tflops": tflops, "mfu": tflops * 1e12 / peak.flops_per_s,
                       "loss": loss.item(),
                       "peak_memory_GiB": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0}
                rows[f"{name} [{kernels}]"] = row
                say(f"{name} [{kernels}] {params / 1e9:.2f}B, seq {seq_len} x {batch}: {seconds * 1e3:,.0f} ms/step, "
                    f"{tokens_s:,.0f} tokens/s, {tflops:,.1f} TFLOP/s, MFU {row['mfu']:.1%}, "
                    f"{row['peak_memory_GiB']:.1f} GiB")
            except Exception as e:  # one model's failure (memory, a kernel) must not lose the others' figures
                say(f"{name} [{kernels}]: FAILED {type(e).__name__}: {str(e)[:300]}")
                traceback.print_exc()
            finally:
                model = opt = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    RESULTS["models"] = rows


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--sections", default="copy,matmul,check,scan,ssd,conv,models")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    RESULTS["device"] = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    RESULTS["torch"], RESULTS["date"] = torch.__version__, date.today().isoformat()
    try:
        import triton
        RESULTS["triton"] = triton.__version__
    except ImportError:
        RESULTS["triton"] = None
    say(f"{RESULTS['device']}, torch {torch.__version__}, triton {RESULTS['triton']}, {RESULTS['date']}")
    sections = {"copy": lambda: copy_bandwidth(device, args.tiny), "matmul": lambda: matmul_peak(device, args.tiny),
                "check": lambda: check_kernels(device, args.tiny), "scan": lambda: bench_scan(device, args.tiny),
                "ssd": lambda: bench_ssd(device, args.tiny), "conv": lambda: bench_conv(device, args.tiny),
                "models": lambda: bench_models(device, args.tiny, 64 if args.tiny else args.seq_len,
                                               2 if args.tiny else args.batch, args.steps)}
    for name in args.sections.split(","):
        started = time.perf_counter()
        try:
            sections[name]()
        except Exception as e:
            say(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc()
        say(f"({name}: {time.perf_counter() - started:.0f} s)")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_fast_paths.json").write_text(json.dumps(RESULTS, indent=1))
    print("\n".join(["", "== summary =="] + LINES), file=sys.stderr)


if __name__ == "__main__":
    main()
