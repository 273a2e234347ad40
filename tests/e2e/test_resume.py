"""Stop after k steps, run the same command again: losses from step k on equal an uninterrupted run."""

import json

import pytest

from helpers import REPO, read_metrics, run_chimera

TINY = REPO / "configs/runs/tiny.yaml"


@pytest.mark.parametrize(
    "nproc, extra",
    [(1, []), (2, ["--set", "parallel.zero_stage=2", "--set", "train.micro_batch_size=2"])],
    ids=["single", "dp2-zero2"],
)
def test_interrupted_run_continues_exactly(tmp_path, nproc, extra):
    args = ["--nproc", nproc, "--set", "train.steps=6", "--set", "checkpoint.every=2", *extra]
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = run_chimera("train", TINY, "--run-dir", full, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]

    proc = run_chimera("train", TINY, "--run-dir", cut, *args, "--set", "train.stop_after=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(cut)] == [1, 2, 3]
    state = json.loads((cut / "checkpoints/step_00000003/trainer_state.json").read_text())
    assert state["step"] == 3 and state["consumed"] == 12

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
