"""A checkpoint written under one layout resumes under another with the same `chimera train` command and a changed
`parallel` section: model, optimizer moments, schedule, step and data position carry over.

Each case stops a 4-step run after step 2 on layout A, reruns the command on layout B, and compares steps 3-4 with
an uninterrupted run on B from the same start (1e-5 relative); `samples.jsonl` holds the same global samples, none
lost or repeated.
"""

import json

import pytest

from helpers import REPO, read_metrics, run_chimera

TINY = REPO / "configs/runs/tiny.yaml"
COMMON = ["--set", "train.steps=4", "--set", "train.global_batch_size=4", "--set", "train.micro_batch_size=2",
          "--set", "data.seq_len=32", "--set", "checkpoint.every=2", "--set", "data.log_samples=true"]


def layout(*fields):
    return [x for f in fields for x in ("--set", f)]


# name: (model, (ranks, fields) before, (ranks, fields) after)
CASES = {
    "tp2-to-dp2-zero3": ("griffin-tiny", (2, layout("parallel.tensor=2")), (2, layout("parallel.zero_stage=3"))),
    "dp2-zero1-to-pp2": ("zamba2-tiny", (2, layout("parallel.zero_stage=1")), (2, layout("parallel.pipeline=2"))),
    "pp2-to-tp2": ("zamba2-tiny", (2, layout("parallel.pipeline=2", "parallel.zero_stage=1")),
                   (2, layout("parallel.tensor=2", "parallel.data=1"))),
    "ep2-to-ep1": ("jamba-tiny", (2, layout("parallel.expert=2", "parallel.zero_stage=1")), (1, [])),
    "cp2-to-cp1": ("jamba-tiny", (2, layout("parallel.context=2")), (1, [])),
    "dp2-zero2-to-dp1-zero0": ("griffin-tiny", (2, layout("parallel.zero_stage=2")), (1, [])),
}


def train(run_dir, model, ranks, fields, *extra):
    proc = run_chimera("train", TINY, "--run-dir", run_dir, "--nproc", ranks, "--set", f"model.preset={model}",
                       *COMMON, *fields, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Runs on the new layouts, each once (cases that end on the same layout share it)."""
    done = {}

    def run(model, ranks, fields):
        key = (model, ranks, tuple(fields))
        if key not in done:
            run_dir = tmp_path_factory.mktemp("uninterrupted")
            train(run_dir, model, ranks, fields)
            done[key] = run_dir
        return done[key]

    return run


@pytest.mark.parametrize("case", CASES)
def test_resume_on_another_layout(tmp_path, uninterrupted, case):
    model, (ranks_a, fields_a), (ranks_b, fields_b) = CASES[case]
    train(tmp_path, model, ranks_a, fields_a, "--set", "train.stop_after=2")
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    proc = train(tmp_path, model, ranks_b, fields_b)  # the same command, another layout
    assert "resumed at step 2" in proc.stdout
    ref = uninterrupted(model, ranks_b, fields_b)
    resumed, expected = read_metrics(tmp_path), read_metrics(ref)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed[2:], expected[2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples == [json.loads(line) for line in (ref / "samples.jsonl").read_text().splitlines()]
    seen = [i for row in samples for ids in row["samples"].values() for i in ids]
    assert len(seen) == len(set(seen))  # no sample read twice
