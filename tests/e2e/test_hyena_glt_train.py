"""Hyena-GLT (the byte-latent model) through `chimera train` as a user runs it: on a real genome (phage lambda, cut
into 1 kbp FASTA records), the loss falls, the patch statistics reach the metrics, and an interrupted run resumes
to the same losses as an uninterrupted one; layouts it cannot run are one line, exit 2."""

import gzip

import pytest
from realdata import lambda_phage_fasta

from helpers import REPO, read_metrics, run_chimera

TINY = REPO / "configs/runs/tiny.yaml"
RECORD = 1000


@pytest.fixture(scope="module")
def genome(tmp_path_factory):
    fasta, _real = lambda_phage_fasta()
    seq = "".join(line.strip() for line in gzip.decompress(fasta.read_bytes()).decode().splitlines()
                  if not line.startswith(">"))
    root = tmp_path_factory.mktemp("lambda")
    records = root / "lambda_1kbp.fa"
    records.write_text("".join(f">lambda:{i}-{i + RECORD}\n{seq[i:i + RECORD]}\n" for i in range(0, len(seq), RECORD)))
    out = root / "zarr"
    proc = run_chimera("data", "prepare", records, "--tokenizer", "bytes", "--format", "zarr", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def train(run_dir, genome, *extra):
    return run_chimera("train", TINY, "--run-dir", run_dir, "--set", "model.preset=hyena-glt-tiny",
                       "--set", f"data.sources=[{{type: zarr, path: '{genome}'}}]", "--set", "data.packing=boundaries",
                       "--set", "train.steps=24", "--set", "train.lr=0.005", "--set", "train.warmup_steps=3",
                       "--set", "checkpoint.every=12", *extra)


def test_trains_on_a_genome_and_resumes(tmp_path, genome):
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = train(full, genome)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(full)
    losses = [r["loss"] for r in rows]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 1.0, losses  # bytes of DNA: from ~ln(320) down
    last = rows[-1]
    assert 1.0 <= last["byte_latent/bridge/mean_patch_length"] <= 64
    assert last["byte_latent/bridge/compression_ratio"] >= 1.0

    proc = train(cut, genome, "--set", "train.stop_after=12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = train(cut, genome)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed at step 12" in proc.stdout
    resumed = read_metrics(cut)
    assert [r["step"] for r in resumed] == list(range(1, 25))
    for a, b in zip(resumed, rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), a["step"]


@pytest.mark.parametrize("args, expected", [
    (["--set", "parallel.pipeline=2", "--nproc", "2"], "parallel.pipeline=2: a byte-latent model"),
    (["--set", "parallel.context=2", "--nproc", "2"], "parallel.context=2: a byte-latent model"),
    (["--set", "parallel.tensor=2", "--set", "parallel.sequence_parallel=true", "--nproc", "2"],
     "parallel.sequence_parallel with a byte-latent model"),
    (["--set", "model.byte_latent.patching=sometimes"], "model.byte_latent.patching: bad value 'sometimes'"),
    (["--set", "model.byte_latent.local_model={d_model: 30}"], "byte_latent.local_model"),
])
def test_what_it_cannot_run_is_one_line(tmp_path, args, expected):
    run_dir = tmp_path / "run"
    proc = run_chimera("train", TINY, "--run-dir", run_dir, "--set", "model.preset=hyena-glt-tiny", *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("chimera: error:"), proc.stderr
    assert expected in lines[0]
    assert not run_dir.exists()
