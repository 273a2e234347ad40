"""`chimera train` of gryphon-tiny at TP=2 with label smoothing: every S5 layer's eigenvalue monitor is in each
metrics line, and the last line's figures are those of the saved weights."""

import torch

from chimera.models import complex_pairs as cx
from chimera.models.mixers.s5 import S5Layer
from helpers import REPO, read_metrics, run_chimera

TINY = REPO / "configs/runs/tiny.yaml"


def test_s5_stability_monitor_reaches_the_metrics_line(tmp_path):
    proc = run_chimera("train", TINY, "--run-dir", tmp_path, "--nproc", 2, "--set", "model.preset=gryphon-tiny",
                       "--set", "parallel.tensor=2", "--set", "train.label_smoothing=0.1",
                       "--set", "model.s5_monitor_eps=0.01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path)
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 4
    keys = ("s5/layers.0/max_abs_lambda_bar", "s5/layers.0/near_unit_fraction",
            "s5/layers.4/max_abs_lambda_bar", "s5/layers.4/near_unit_fraction")
    assert all(k in r for r in steps for k in keys)
    model = __import__("chimera").load_model(tmp_path)  # the weights after the last step, whole (one process)
    for index in (0, 4):
        layer = model.layers[index].mixer
        assert isinstance(layer, S5Layer)
        magnitude = cx.abs(layer.ssm.discretized(torch.float64)[0])  # |Lambda_bar|, 32 states, both TP shards
        assert magnitude.numel() == 32
        assert steps[-1][f"s5/layers.{index}/max_abs_lambda_bar"] == round(float(magnitude.max()), 6)
        near = float((magnitude > 1 - 0.01).double().mean())
        assert steps[-1][f"s5/layers.{index}/near_unit_fraction"] == round(near, 6)
        assert 0.9 < float(magnitude.max()) < 1.0
