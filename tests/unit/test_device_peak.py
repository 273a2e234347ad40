"""The peak MFU is measured against: the datasheet table for known GPUs, else a measured matmul peak, cached."""

from __future__ import annotations

import json

import pytest
import torch

from chimera.trainer.device_peak import cache_path, datasheet_peak, peak_flops


@pytest.mark.parametrize("name, kind, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),  # SXM
    ("NVIDIA H100 PCIe", "bf16", 756.5),
    ("NVIDIA H200", "fp32", 66.9),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100 80GB PCIe", "tf32", 156.0),
])
def test_datasheet_peaks(name, kind, tflops):
    assert datasheet_peak(name, kind).flops_per_s == pytest.approx(tflops * 1e12)


def test_unknown_gpu_has_no_datasheet_peak():
    assert datasheet_peak("NVIDIA GeForce GT 710", "bf16") is None


def test_cpu_peak_is_measured_and_the_cache_keeps_the_best(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("CHIMERA_PEAK_TFLOPS", raising=False)
    first = peak_flops(torch.device("cpu"), "fp32")
    assert cache_path() == tmp_path / "chimera/peak.json"
    cached = json.loads(cache_path().read_text())
    [(key, value)] = cached.items()
    assert value == first.flops_per_s > 1e8  # at least 0.1 GFLOP/s: a real measurement
    assert f"{torch.get_num_threads()} threads" in key and "fp32" in key
    assert "cached" in first.source
    # a figure measured under load is replaced by the next, higher one
    cache_path().write_text(json.dumps({key: 12345.0}))
    again = peak_flops(torch.device("cpu"), "fp32").flops_per_s
    assert again > 1e8 and json.loads(cache_path().read_text())[key] == again
    # one higher than this measurement stays
    cache_path().write_text(json.dumps({key: 1e18}))
    assert peak_flops(torch.device("cpu"), "fp32").flops_per_s == 1e18
    assert json.loads(cache_path().read_text()) == {key: 1e18}


def test_the_environment_overrides_the_peak(monkeypatch):
    monkeypatch.setenv("CHIMERA_PEAK_TFLOPS", "2.5")
    assert peak_flops(torch.device("cpu"), "bf16").flops_per_s == 2.5e12
