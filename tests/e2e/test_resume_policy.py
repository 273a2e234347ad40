"""Resume is never silently wrong: a changed model is refused with nothing rewritten, the changes a user means are
allowed and said (more steps with a stated schedule rule), a finished run says so, `--restart` and `--resume-from`
do what they say, and the records read as one trajectory."""

import hashlib
import json
import math
import shutil

import pytest

from chimera.configs.loader import load_run_config
from chimera.trainer.optim import ScheduleAnchor, lr_at
from helpers import REPO, read_metrics, run_chimera

TINY = REPO / "configs/runs/tiny.yaml"
BASE = ["--set", "train.steps=3", "--set", "logging.progress=false"]


def fingerprint(run_dir) -> dict:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-step tiny run (the issue's `x`)."""
    run_dir = tmp_path_factory.mktemp("x") / "x"
    proc = run_chimera("train", TINY, "--run-dir", run_dir, *BASE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("change, field", [("model.preset=llama-tiny", "model.pattern"),
                                           ("model.window=8", "model.window")])
def test_a_changed_model_is_refused_and_nothing_rewritten(tmp_path, finished, change, field):
    run_dir = tmp_path / "x"
    shutil.copytree(finished, run_dir)
    before = fingerprint(run_dir)
    proc = run_chimera("train", TINY, "--run-dir", run_dir, *BASE, "--set", "train.steps=6", "--set", change)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert field in lines[0] and "config.yaml" in lines[0]
    assert fingerprint(run_dir) == before  # config.yaml and the checkpoints byte for byte


def test_a_finished_run_says_so_and_exits_at_once(finished):
    before = fingerprint(finished)
    proc = run_chimera("train", TINY, "--run-dir", finished, *BASE)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"chimera: {finished} is finished: it reached step 3 (train.steps=3); raise " \
                                  "train.steps to train on"
    assert fingerprint(finished) == before


def test_more_steps_continue_the_schedule_from_where_it_was(tmp_path):
    args = ["--set", "train.steps=8", "--set", "logging.progress=false"]
    proc = run_chimera("train", TINY, "--run-dir", tmp_path, *args, "--set", "train.stop_after=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_chimera("train", TINY, "--run-dir", tmp_path, "--set", "train.steps=12", "--set",
                       "logging.progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stdout.splitlines() if "resuming" in line and "with changes" in line]
    assert len(said) == 1 and "train.steps 8 -> 12 (the learning rate goes on from" in said[0], proc.stdout
    old = load_run_config(TINY, ["train.steps=8"]).train
    new = load_run_config(TINY, ["train.steps=12"]).train
    anchor = ScheduleAnchor(5, lr_at(5, old))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:  # step s runs update s - 1
        expected = lr_at(r["step"] - 1, old) if r["step"] <= 5 else lr_at(r["step"] - 1, new, anchor)
        assert math.isclose(r["lr"], expected, rel_tol=1e-9), r["step"]
    assert math.isclose(rows[-1]["lr"], new.min_lr, rel_tol=1e-9)  # the last step reaches min_lr
    state = json.loads((tmp_path / "checkpoints/step_00000012/trainer_state.json").read_text())
    assert state["schedule_anchor"] == {"step": 5, "lr": anchor.lr}


def test_resume_from_an_older_step_sets_the_newer_checkpoints_aside(tmp_path):
    args = ["--set", "train.steps=6", "--set", "checkpoint.every=2", "--set", "checkpoint.keep=3",
            "--set", "logging.progress=false"]
    assert run_chimera("train", TINY, "--run-dir", tmp_path / "full", *args).returncode == 0
    run_dir = tmp_path / "run"
    shutil.copytree(tmp_path / "full", run_dir)
    proc = run_chimera("train", TINY, "--run-dir", run_dir, *args, "--resume-from", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed at step 2" in proc.stdout
    assert sorted(p.name for p in (run_dir / "superseded").iterdir()) == ["step_00000004", "step_00000006"]
    rows, reference = read_metrics(run_dir), read_metrics(tmp_path / "full")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # one trajectory: the replayed steps once
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference], rel=1e-6)
    superseded = [json.loads(line)["step"] for line in (run_dir / "metrics.superseded.jsonl").read_text().splitlines()]
    assert superseded == [3, 4, 5, 6]
    bad = run_chimera("train", TINY, "--run-dir", run_dir, *args, "--resume-from", 3)
    assert bad.returncode == 2 and "no checkpoint of that step" in bad.stderr


def test_restart_starts_afresh_and_keeps_the_old_run(tmp_path, finished):
    run_dir = tmp_path / "x"
    shutil.copytree(finished, run_dir)
    before = fingerprint(run_dir)
    proc = run_chimera("train", TINY, "--run-dir", run_dir, *BASE, "--set", "model.preset=llama-tiny", "--restart")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from scratch" in proc.stdout and "moved to" in proc.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    kept = fingerprint(run_dir / "restarted/1")
    assert {k: v for k, v in before.items()} == kept  # the old run, whole


def test_a_preempted_run_resumed_reads_as_one_trajectory(tmp_path):
    """Rows written after the last checkpoint (a crash, here simulated by appending them) are superseded on resume."""
    args = ["--set", "train.steps=6", "--set", "checkpoint.every=2", "--set", "logging.progress=false"]
    assert run_chimera("train", TINY, "--run-dir", tmp_path, *args, "--set", "train.stop_after=4").returncode == 0
    rows = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "metrics.jsonl").write_text(rows + json.dumps({"step": 5, "loss": 9.0}) + "\n")  # died after 5
    proc = run_chimera("train", TINY, "--run-dir", tmp_path, *args)
    assert proc.returncode == 0
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert 9.0 not in [r["loss"] for r in read_metrics(tmp_path)]
    resume = [e for e in map(json.loads, (tmp_path / "events.jsonl").read_text().splitlines())
              if e["event"] == "resume"]
    assert resume[-1]["step"] == 4 and resume[-1]["superseded_rows"] == 1
