"""Bad steps: an injected NaN loss skips that step's update and nothing else (the weights equal a run that skipped
that batch), on one rank and through the pipeline engine; too many in a row roll the run back to its last
checkpoint with their batches skipped, and it continues exactly; a loss spike is judged against the running
median."""

import json

import pytest
import torch

from chimera.configs.schema import SpikeConfig
from chimera.trainer.bad_steps import BadStepMonitor
from chimera.trainer.checkpoint import read_weights
from helpers import REPO, read_metrics, run_chimera

TINY = REPO / "configs/runs/tiny.yaml"
ARGS = ["--set", "train.steps=6", "--set", "checkpoint.every=2", "--set", "logging.progress=false"]
PIPELINE = ["--nproc", 2, "--set", "parallel.pipeline=2", "--set", "train.micro_batch_size=2"]


def train(run_dir, *extra):
    proc = run_chimera("train", TINY, "--run-dir", run_dir, *ARGS, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def final_weights(run_dir) -> dict:
    return read_weights(run_dir / "checkpoints/step_00000006")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("layout", [[], PIPELINE], ids=["one-rank", "pp2"])
def test_a_nan_step_is_skipped_as_if_its_batch_were(tmp_path, layout):
    proc = train(tmp_path / "nan", *layout, "--set", "train.fault_injection.nan_loss_at=[3]")
    assert "step 3: update skipped (non-finite loss (nan))" in proc.stdout
    train(tmp_path / "skip", *layout, "--set", "train.skip_steps=[3]")
    train(tmp_path / "plain", *layout)
    assert_same_weights(final_weights(tmp_path / "nan"), final_weights(tmp_path / "skip"))
    nan, plain = read_metrics(tmp_path / "nan"), read_metrics(tmp_path / "plain")
    assert nan[2]["loss"] is None and nan[2]["skipped"].startswith("non-finite loss")
    assert nan[3]["lr"] == plain[2]["lr"]  # the schedule did not advance on the skipped step
    assert [r["loss"] for r in nan[:2]] == pytest.approx([r["loss"] for r in plain[:2]], rel=1e-6)
    assert nan[3]["loss"] != pytest.approx(plain[3]["loss"], rel=1e-3)  # the weights after step 3 are step 2's
    # the weights the NaN touched are clean
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "nan").values())


def test_consecutive_bad_steps_roll_back_and_continue_exactly(tmp_path):
    proc = train(tmp_path / "rollback", "--set", "train.fault_injection.nan_loss_at=[3,4,5]",
                 "--set", "train.spike.max_consecutive=3")
    assert "3 bad steps in a row (steps 3-5): rolling back to the last checkpoint (step 4)" in proc.stdout
    train(tmp_path / "skip", "--set", "train.skip_steps=[3,4,5]")
    assert_same_weights(final_weights(tmp_path / "rollback"), final_weights(tmp_path / "skip"))
    rows, reference = read_metrics(tmp_path / "rollback"), read_metrics(tmp_path / "skip")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the rolled-back step 5 once
    for a, b in zip(rows, reference):
        assert (a["loss"] is None) == (b["loss"] is None) == (a["step"] in (3, 4, 5)), a["step"]
        assert a["loss"] is None or a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]
    events = [json.loads(line) for line in (tmp_path / "rollback/events.jsonl").read_text().splitlines()]
    rollback = [e for e in events if e["event"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["skip_steps"] == [3, 4, 5] and rollback[0]["to_step"] == 4
    assert json.loads((tmp_path / "rollback/skip_steps.json").read_text()) == [3, 4, 5]


def test_a_loss_spike_is_judged_against_the_running_median():
    monitor = BadStepMonitor(SpikeConfig(factor=2.0, window=5))
    for step, loss in enumerate([5.0, 4.0, 4.5, 3.9, 4.2], start=1):
        assert monitor.judge(loss) is None
        monitor.record(step, loss, None)
    assert monitor.judge(8.0) is None  # 8.0 < 2 x median 4.2
    assert monitor.judge(8.5).startswith("loss spike (8.5 > 2 x the running median 4.2)")
    assert monitor.judge(float("inf")).startswith("non-finite loss")
    assert not monitor.record(6, 8.5, "spike") and monitor.record(7, 9.0, "spike") is False
    assert monitor.record(8, 9.0, "spike")  # the third in a row: roll back
    restored = BadStepMonitor(SpikeConfig(factor=2.0, window=5), monitor.state())
    assert restored.state() == monitor.state() and list(restored.recent) == [5.0, 4.0, 4.5, 3.9, 4.2]
