"""The peak FLOP/s of one device, which MFU is measured against.

A GPU the table knows gets its datasheet's dense peak for the training precision; any other device (a CPU, an
unknown GPU) gets its measured peak: the best of a few large matrix products in that precision, kept in
``$XDG_CACHE_HOME/chimera/peak.json`` (default ``~/.cache``), keyed by the device's name, the dtype and, on a CPU,
torch's thread count (the peak scales with it). A measurement taken while other work shares the device reads low,
never high, so a first figure is not kept forever: each process measures again (one short round) and the cache keeps
the highest figure seen. (One cache here held 18 GFLOP/s for 2 threads, measured under a test suite's load, beside
91 for 1 thread; 2 threads give ~190 when idle, so MFU read 10x too high.) ``CHIMERA_PEAK_TFLOPS`` overrides both
(a device the table lacks, a fixed figure across machines).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Dense (no structured sparsity) peak TFLOP/s by device-name substring, most specific first. fp32 is the CUDA-core
# rate (torch's fp32 matmuls do not use TF32 unless allowed), tf32 the tensor-core rate when they do. Sources: NVIDIA
# H100 Tensor Core GPU datasheet (SXM: FP32 67, TF32 989 / BF16 1,979 "with sparsity", i.e. 494.7 / 989.4 dense;
# PCIe: 51, 756 / 1,513 sparse; NVL: 60, 835 / 1,671 sparse), NVIDIA H200 datasheet (as H100 SXM), NVIDIA A100
# datasheet (FP32 19.5, TF32 156, BF16 312 dense).
PEAKS_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Peak:
    flops_per_s: float
    source: str  # where the figure comes from: "datasheet NAME", "measured (cached in PATH)", "CHIMERA_PEAK_TFLOPS"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _precision_on(device: torch.device, precision: str) -> str:
    if precision == "fp32" and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return precision


def cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chimera" / "peak.json"


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 8,
                        rounds: int = 3) -> float:
    """FLOP/s of the fastest of ``rounds`` rounds of ``repeats`` products ``[n, n] x [n, n]`` (``2 n^3`` FLOPs
    each)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b  # warm-up
    sync()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2.0 * n ** 3 / best


def datasheet_peak(name: str, kind: str) -> Peak | None:
    """The table's dense peak of the GPU named ``name`` for ``kind`` (bf16, tf32, fp32), or None."""
    for key, peaks in PEAKS_TFLOPS.items():
        if key in name:
            return Peak(peaks[kind] * 1e12, f"datasheet {key} {kind} dense")
    return None


def peak_flops(device: torch.device, precision: str) -> Peak:
    """The peak FLOP/s of ``device`` for training in ``precision`` (``fp32`` or ``bf16``)."""
    override = os.environ.get("CHIMERA_PEAK_TFLOPS")
    if override:
        return Peak(float(override) * 1e12, "CHIMERA_PEAK_TFLOPS")
    name, kind = device_name(device), _precision_on(device, precision)
    if device.type == "cuda" and datasheet_peak(name, kind) is not None:
        return datasheet_peak(name, kind)
    key = f"{name} | {kind}" + (f" | {torch.get_num_threads()} threads" if device.type == "cpu" else "")
    path = cache_path()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    measured = measure_matmul_peak(device, DTYPES[precision], n=2048 if device.type == "cuda" else 1024,
                                   rounds=1 if key in cached else 3)
    if measured > cached.get(key, 0.0):
        cached[key] = measured
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cached, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home: the figure of this process alone
    return Peak(float(cached[key]), f"best measured matmul peak ({key}; cached in {path})")
