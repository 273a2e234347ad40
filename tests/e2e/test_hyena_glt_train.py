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
                       "--set", "train.steps=60", "--set", "train.lr=0.005", "--set", "train.warmup_steps=3",
                       "--set", "checkpoint.every=30", *extra)


def test_trains_on_a_genome_and_resumes(tmp_path, genome):
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = train(full, genome)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(full)
    losses = [r["loss"] for r in rows]
    # the byte loss plus the entropy model's: from 2 ln(320) = 11.5 towards 2 ln(4) = 2.8 (DNA is close to random)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 5.0, losses
    # patches: one per byte while the entropy model knows nothing (ln 320 nats > the threshold), longer once it has
    # learnt the alphabet (entropy near ln 4, around the preset's threshold 1.5); never past max_patch_length 8
    lengths = [r["byte_latent/bridge/mean_patch_length"] for r in rows]
    assert lengths[0] == 1.0 and max(lengths[-20:]) > 1.5 and max(lengths) <= 8, lengths
    entropy = [r["byte_latent/bridge/next_byte_entropy"] for r in rows]
    assert entropy[0] > 5.0 and entropy[-1] < 2.0
    assert all(r["byte_latent/bridge/compression_ratio"] >= 1.0 for r in rows)

    proc = train(cut, genome, "--set", "train.stop_after=30")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = train(cut, genome)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed at step 30" in proc.stdout
    resumed = read_metrics(cut)
    assert [r["step"] for r in resumed] == list(range(1, 61))
    for a, b in zip(resumed, rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), a["step"]


@pytest.mark.parametrize("args, expected", [
    (["--set", "parallel.pipeline=2", "--nproc", "2"], "parallel.pipeline=2: a byte-latent model"),
    (["--set", "parallel.context=2", "--nproc", "2"], "parallel.context=2: a byte-latent model"),
    (["--set", "parallel.tensor=2", "--set", "parallel.sequence_parallel=true", "--nproc", "2"],
     "parallel.sequence_parallel with a byte-latent model"),
    (["--set", "model.byte_latent.patching=sometimes"], "model.byte_latent.patching: bad value 'sometimes'"),
    (["--set", "model.byte_latent.local_model={d_model: 30}"], "byte_latent.local_model"),
    (["--set", "model.byte_latent.merge_max_ratio=0.9"], "model.byte_latent.merge_max_ratio: bad value 0.9"),
    (["--dry-run"], "chimera plan does not model a byte-latent model's memory"),
])
def test_what_it_cannot_run_is_one_line(tmp_path, args, expected):
    run_dir = tmp_path / "run"
    proc = run_chimera("train", TINY, "--run-dir", run_dir, "--set", "model.preset=hyena-glt-tiny", *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("chimera: error:"), proc.stderr
    assert expected in lines[0]
    assert not run_dir.exists()
