"""Selecting the Triton kernels changes no training loss: the same 3-step run with ``model.kernels=reference`` and
``model.kernels=triton`` (the kernels in Triton's interpreter, ``TRITON_INTERPRET=1`` from ``tests/conftest.py``),
through the real trainer. Tolerance: fp32, the kernels sum in another order than the reference; after three AdamW
steps the losses agree to 1e-5 relative (measured 8e-8). Griffin runs the scan, short-conv, RMSNorm and RoPE kernels,
Hyena the short-conv and gate kernels and Mamba the fused selective scan (two layers each: the interpreter is slow);
Mamba-2's SSD kernel is held to the reference, loss and gradients, in ``tests/unit/test_kernels.py`` (a 3-step run of
it takes minutes in the interpreter)."""

import pytest

from helpers import REPO, read_metrics, run_chimera

TINY = REPO / "configs/runs/tiny.yaml"


@pytest.mark.parametrize("preset,overrides", [("griffin-tiny", []), ("hyena-tiny", ["--set", "model.num_layers=2"]),
                                              ("mamba-tiny", ["--set", "model.num_layers=2"])])
def test_triton_kernels_train_to_the_reference_losses(tmp_path, preset, overrides):
    losses = {}
    for kernels in ("reference", "triton"):
        proc = run_chimera("train", TINY, "--run-dir", tmp_path / kernels, "--set", f"model.preset={preset}",
                           *overrides, "--set", "train.steps=3", "--set", f"model.kernels={kernels}",
                           "--set", "data.seq_len=24",
                           "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=2",
                           "--set", "logging.progress=false", env={"TRITON_INTERPRET": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[kernels] = [r["loss"] for r in read_metrics(tmp_path / kernels)]
    assert len(losses["triton"]) == 3
    assert losses["triton"] == pytest.approx(losses["reference"], rel=1e-5)
    assert losses["triton"][0] != losses["triton"][-1]  # the steps trained
