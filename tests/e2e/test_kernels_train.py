"""Selecting the fast paths changes no training loss: the same 3-step run with ``model.kernels=reference`` and
``model.kernels=triton`` (the kernels in Triton's interpreter, ``TRITON_INTERPRET=1`` from ``tests/conftest.py``) or
``model.kernels=auto`` (on CPU its fast paths: the SSD, the RG-LRU and the short conv with their backward by hand),
through the real trainer. Tolerance: fp32, the kernels sum in another order than the reference; after three AdamW
steps the losses agree to 1e-5 relative (measured 8e-8). Griffin runs the scan, short-conv, RMSNorm and RoPE kernels,
Hyena the short-conv and gate kernels and Mamba the fused selective scan (two layers each: the interpreter is slow);
Mamba-2's SSD kernel is held to the reference, loss and gradients, in ``tests/unit/test_kernels.py`` (a 3-step run of
it takes minutes in the interpreter)."""

import pytest

from helpers import REPO, read_metrics, run_chimera

TINY = REPO / "configs/runs/tiny.yaml"


@pytest.mark.parametrize("preset,overrides,fast", [
    ("griffin-tiny", [], ("triton", "auto")),  # auto on CPU: the RG-LRU by hand, the short conv's taps
    ("hyena-tiny", ["--set", "model.num_layers=2"], ("triton",)),
    ("mamba-tiny", ["--set", "model.num_layers=2"], ("triton",)),
    ("mamba2-tiny", ["--set", "model.num_layers=2"], ("auto",)),  # auto on CPU: the SSD by hand, the taps
])
def test_fast_paths_train_to_the_reference_losses(tmp_path, preset, overrides, fast):
    """``triton``: the kernels in the interpreter; ``auto``: CPU's fast paths (``chimera.models.ops.dispatch``)."""
    losses = {}
    for kernels in ("reference", *fast):
        proc = run_chimera("train", TINY, "--run-dir", tmp_path / kernels, "--set", f"model.preset={preset}",
                           *overrides, "--set", "train.steps=3", "--set", f"model.kernels={kernels}",
                           "--set", "data.seq_len=24",
                           "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=2",
                           "--set", "logging.progress=false", env={"TRITON_INTERPRET": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[kernels] = [r["loss"] for r in read_metrics(tmp_path / kernels)]
    for kernels in fast:
        assert len(losses[kernels]) == 3
        assert losses[kernels] == pytest.approx(losses["reference"], rel=1e-5), kernels
        assert losses[kernels][0] != losses[kernels][-1]  # the steps trained
