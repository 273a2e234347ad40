"""Stop after k steps, run the same command again: losses from step k on equal an uninterrupted run."""

import json

import pytest

from helpers import REPO, read_metrics, run_chimera

TINY = REPO / "configs/runs/tiny.yaml"


# Two ranks under ZeRO-2 stopping and resuming: tests/e2e/test_resume_layouts.py (dp2-zero2-to-dp1-zero0 and the rest).
@pytest.mark.parametrize("nproc, extra", [(1, [])], ids=["single"])
def test_interrupted_run_continues_exactly(tmp_path, nproc, extra):
    args = ["--nproc", nproc, "--set", "train.steps=6", "--set", "checkpoint.every=2", *extra]
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = run_chimera("train", TINY, "--run-dir", full, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]

    proc = run_chimera("train", TINY, "--run-dir", cut, *args, "--set", "train.stop_after=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(cut)] == [1, 2, 3]
    state = json.loads((cut / "checkpoints/step_00000003/trainer_state.json").read_text())
    assert state["step"] == 3 and state["data"]["sequences"] == 12

    proc = run_chimera("train", TINY, "--run-dir", cut, *args)  # the same command again
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed at step 3" in proc.stdout
    uninterrupted, resumed = read_metrics(full), read_metrics(cut)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed, uninterrupted):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), a["step"]
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    # keep=2: only the newest two checkpoints remain
    assert sorted(p.name for p in (cut / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]


def test_preemption_signal_checkpoints_and_the_rerun_resumes(tmp_path):
    """SIGTERM to the launcher: every rank finishes its step, one checkpoint is written, and the run exits with the
    code of a run stopped early (75), so that a scheduler tells it from a finished one."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["train", TINY, "--run-dir", tmp_path, "--nproc", 2, "--set", "train.micro_batch_size=2",
            "--set", "train.steps=100000", "--set", "checkpoint.every=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.Popen([sys.executable, "-m", "chimera.launch.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err
    steps = [r["step"] for r in read_metrics(tmp_path)]
    saved = json.loads((tmp_path / "checkpoints" / (tmp_path / "checkpoints/latest").read_text()
                        / "trainer_state.json").read_text())
    assert saved["step"] == steps[-1] >= 3 and saved["data"]["sequences"] == 4 * saved["step"]

    rerun = run_chimera(*args[:-4], "--set", "train.micro_batch_size=2", "--set", f"train.steps={steps[-1] + 1}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed at step {steps[-1]}" in rerun.stdout
    assert [r["step"] for r in read_metrics(tmp_path)] == steps + [steps[-1] + 1]
