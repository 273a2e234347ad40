"""WebDataset shards of bounded size: documents longer than a shard are cut into chunks over consecutive shards
and read back whole, one document id each, so the stream (and ``packing: boundaries``) sees the same documents."""

import numpy as np
import pytest

from chimera.data.dataset_files import TAR_RECORD, ShardWriter, read_manifest
from chimera.data.prepare import prepare
from chimera.data.readers import BadData
from chimera.data.sources import WebDatasetSource
from chimera.data.stream import TokenStream
from chimera.tests.helpers import run_chimera

SHARD_MB = 0.03  # 31457 bytes: 3 tar records, 14336 uint16 tokens of data per shard


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 60 kbp 'phage' (several shards long) between short documents and one of ~ one shard."""
    root = tmp_path_factory.mktemp("split")
    rng = np.random.default_rng(1)
    sizes = [300, 60_000, 50, 15_000, 7, 30_000, 900]
    files = []
    for i, n in enumerate(sizes):
        f = root / f"doc{i}.txt"
        f.write_text("".join(rng.choice(list("abcdefgh"), size=n)))
        files.append(str(f))
    return root, files, sizes


def prepared(inputs, name, shard_mb):
    root, files, _ = inputs
    out = root / name
    if not out.exists():
        prepare(files, "bytes", "webdataset", str(out), shard_mb=shard_mb, progress=False)
    return out


def test_long_documents_span_shards_of_bounded_size(inputs):
    root, files, sizes = inputs
    out = prepared(inputs, "small", SHARD_MB)
    _, manifest = read_manifest(out)
    limit = int(SHARD_MB * (1 << 20))
    assert len(manifest["shards"]) >= 8
    for s in manifest["shards"]:
        assert (out / s["path"]).stat().st_size <= max(limit, TAR_RECORD)  # the bound, padding included
    assert sum(s["first_chunk"] > 0 for s in manifest["shards"]) >= 3  # the long documents do span shards


def test_split_shards_read_back_the_documents_exactly(inputs):
    root, files, sizes = inputs
    source = WebDatasetSource(str(prepared(inputs, "small", SHARD_MB)), "s", BadData("fail"), prefetch_shards=0)
    assert source.lengths.tolist() == sizes
    for d, f in enumerate(files):
        assert np.array_equal(source.read(d), np.frombuffer(open(f, "rb").read(), np.uint8).astype(source.dtype))
    assert np.concatenate(source.groups).tolist() == list(range(7))  # every document once, in one group


def test_boundaries_stream_is_the_same_over_split_and_unsplit_shards(inputs):
    split = WebDatasetSource(str(prepared(inputs, "small", SHARD_MB)), "s", BadData("fail"), prefetch_shards=0)
    whole = WebDatasetSource(str(prepared(inputs, "big", 8)), "w", BadData("fail"), prefetch_shards=0)
    assert len(read_manifest(whole.root)[1]["shards"]) == 1
    a = TokenStream(split, split.groups, seed=0, shuffle=False)
    b = TokenStream(whole, whole.groups, seed=0, shuffle=False)
    n = a.epoch_tokens + 100  # into the second epoch
    assert a.epoch_tokens == b.epoch_tokens
    for start in (0, 333, 61_000):  # windows from any cursor (a resume) agree as well
        wa, wb = a.window(start, n - start), b.window(start, n - start)
        assert np.array_equal(wa.tokens, wb.tokens)
        assert np.array_equal(wa.sample_ids, wb.sample_ids) and np.array_equal(wa.offsets, wb.offsets)
        assert np.array_equal(wa.segments(), wb.segments())


def test_too_small_shard_mb_is_one_line_exit_2(inputs, tmp_path):
    root, files, _ = inputs
    r = run_chimera("data", "prepare", files[0], "--tokenizer", "bytes", "--format", "webdataset",
                    "--out", tmp_path / "o", "--shard-mb", "0.001")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--shard-mb" in r.stderr
    assert not (tmp_path / "o").exists()
    with pytest.raises(Exception, match="--shard-mb"):
        ShardWriter(tmp_path, np.uint16, 2047)


def test_shuffled_windows_with_prefetch_and_one_cached_shard_match_the_reference(inputs):
    """Split documents under the real reading path (shuffled order, loads ahead, a cache of one shard), cut into
    short windows as data-parallel ranks would take them: each window equals the same cut of the whole text."""
    ref = WebDatasetSource(str(prepared(inputs, "small", SHARD_MB)), "r", BadData("fail"), prefetch_shards=0)
    fast = WebDatasetSource(str(prepared(inputs, "small", SHARD_MB)), "f", BadData("fail"), cache_shards=1,
                            prefetch_shards=2)
    a, b = TokenStream(ref, ref.groups, seed=3), TokenStream(fast, fast.groups, seed=3)
    order = a.order(0)[0]
    files = inputs[1]
    expected = np.concatenate([np.append(np.frombuffer(open(files[d], "rb").read(), np.uint8), ref.eos_id)
                               for d in order])  # epoch 0 from the input files
    for start in range(0, len(expected) - 1000, 1000):  # consecutive rows: rank r takes every r-th one
        w = b.window(start, 1000)
        assert np.array_equal(w.tokens, expected[start : start + 1000])
        assert np.array_equal(w.sample_ids, a.window(start, 1000).sample_ids)
    fast.wait_for_loads_ahead()
