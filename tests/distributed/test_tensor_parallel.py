"""TP=2 (with and without sequence parallelism) equals TP=1 for the same weights: logits, loss, gradients."""

import os
import sys

import pytest
import torch

from chimera.launch.local import launch
from helpers import REPO

WORKER = str(REPO / "tests/distributed/tp_worker.py")


def run_layout(tmp_path, preset, tp, sp):
    out = tmp_path / f"{preset}-tp{tp}-sp{sp}.pt"
    env_path = os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    os.environ["PYTHONPATH"] = env_path
    assert launch(tp, [sys.executable, WORKER, preset, str(tp), str(int(sp)), str(out)]) == 0
    return torch.load(out)


@pytest.mark.parametrize(
    "preset", ["griffin-tiny", "transformer-tiny", "llama-tiny", "mamba-tiny", "mamba2-tiny", "hybrid-moe-tiny"]
)
def test_tp2_equals_tp1(tmp_path, preset):
    ref = run_layout(tmp_path, preset, 1, False)
    for sp in (False, True):
        got = run_layout(tmp_path, preset, 2, sp)
        # fp32, same weights: only summation order differs between layouts
        torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
        assert got["grads"].keys() == ref["grads"].keys()
        for name in ref["grads"]:
            torch.testing.assert_close(got["grads"][name], ref["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
