"""A source of few long documents (one genome, one chromosome): windows for the train/validation split."""

import json

import numpy as np
import pytest
from realdata import lambda_phage_fasta

from chimera.data.sources import DocumentSource, DocumentWindows, splittable
from chimera.errors import UserError
from helpers import REPO, run_chimera

TINY = REPO / "configs/runs/tiny.yaml"


class Docs(DocumentSource):
    def __init__(self, docs):
        self.name, self.eos_id, self.vocab_size = "toy", 0, 8
        self.docs = [np.asarray(d) for d in docs]
        self.lengths = np.array([len(d) for d in docs])
        self.groups = [np.array([i]) for i in range(len(docs))]

    def read(self, doc_id):
        return self.docs[doc_id]


def test_windows_cover_each_document_exactly_once_in_order():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 8, n) for n in (1000, 37, 250)]
    w = DocumentWindows(Docs(docs), 100)
    assert w.lengths.tolist() == [100] * 10 + [37] + [100, 100, 50]
    for i, d in enumerate(docs):  # the windows of document i, in order, are document i
        np.testing.assert_array_equal(np.concatenate([w.read(k) for k in np.flatnonzero(w.document == i)]), d)


def test_one_document_is_cut_into_windows_on_both_sides_of_the_split():
    source = Docs([np.ones(50_000, dtype=np.int64)])
    assert not source.split_ids(0.02)[0]  # the single document falls in validation: nothing to train on
    cut = splittable(source, 0.02, seq_len=64)
    assert cut.window_tokens == 50_000 // 200 and len(cut.lengths) == 200  # about 4 / val_fraction windows
    train, val = cut.split_ids(0.02)
    ids = np.concatenate(train)
    assert len(val) >= 1 and len(ids) + len(val) == 200 and not set(ids) & set(val)
    again = splittable(source, 0.02, seq_len=64)  # deterministic
    assert [g.tolist() for g in again.split_ids(0.02)[0]] == [g.tolist() for g in train]
    many = Docs([np.ones(10) for _ in range(100)])
    assert splittable(many, 0.05, seq_len=8) is many  # enough documents: left as they are
    with pytest.raises(UserError, match="cannot be split into train and validation"):
        splittable(Docs([np.ones(100)]), 0.02, seq_len=100)


@pytest.fixture(scope="module")
def genome(tmp_path_factory):
    fasta, _real = lambda_phage_fasta()
    out = tmp_path_factory.mktemp("genome") / "lambda"
    proc = run_chimera("data", "prepare", fasta, "--tokenizer", "dna", "--format", "zarr", "--out", out, "--quiet",
                       "--chunk-tokens", "8192")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def genome_args(genome, *more):
    return ["--set", f"data.sources=[{{type: zarr, path: '{genome}'}}]", "--set", "data.tokenizer=dna",
            "--set", "data.log_samples=true", "--set", "data.packing=boundaries", *more]


def test_one_chromosome_trains_and_resumes_exactly(genome, tmp_path):
    """The prepared genome (one document) trains: its windows are recorded in the run, validation runs on held-out
    windows, and a resumed run reads exactly the windows of the uninterrupted one."""
    common = genome_args(genome, "--set", "train.steps=4", "--set", "train.eval_every=2")
    full = run_chimera("train", TINY, "--run-dir", tmp_path / "full", *common)
    assert full.returncode == 0, full.stderr[-3000:]
    event = [json.loads(x) for x in (tmp_path / "full/events.jsonl").read_text().splitlines()
             if '"data_windows"' in x][0]
    # ceil(48502 / (4 / 0.02)) = 243 tokens a window; the genome (real or its stand-in) holds 48502 bases
    assert event["sources"] == {"zarr": {"window_tokens": 243, "windows": 200, "documents": 1}}
    cut = run_chimera("train", TINY, "--run-dir", tmp_path / "cut", *common, "--set", "train.stop_after=2",
                      "--set", "checkpoint.every=2")
    assert cut.returncode == 0, cut.stderr[-3000:]
    cut = run_chimera("train", TINY, "--run-dir", tmp_path / "cut", *common, "--set", "checkpoint.every=2")
    assert cut.returncode == 0 and "resumed at step 2" in cut.stdout, cut.stderr[-3000:]
    read = lambda d: [json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    assert read(tmp_path / "cut") == read(tmp_path / "full")
    rows = [json.loads(x) for x in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows)


def test_an_impossible_split_is_one_line_before_ranks_start(genome, tmp_path):
    proc = run_chimera("train", TINY, "--run-dir", tmp_path / "r", "--nproc", 2,
                       *genome_args(genome, "--set", "data.seq_len=50000", "--set", "train.global_batch_size=2",
                                    "--set", "train.micro_batch_size=1"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and "cannot be split into train and validation" in proc.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
