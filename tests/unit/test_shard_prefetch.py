"""WebDataset shards: loads ahead of the stream, retries of remote reads, and the read-rate figures.

Every test holds the new behaviour to a reference: batches to those of a pipeline that reads each shard
when it reaches it from local files (what the loader did before prefetch), loads to the stream's own
order, retries to the attempts a flaky command counted itself, byte counts to the manifest.
"""

import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from chimera.configs.schema import DataConfig
from chimera.data import loader, sources
from chimera.data.dataset_files import read_manifest
from chimera.data.loader import DataPipeline
from chimera.data.prepare import prepare
from chimera.data.readers import BadData
from chimera.data.sources import WebDatasetSource
from chimera.errors import UserError

SEQ, MICRO, GLOBAL = 64, 2, 8

# A shard read through a command that fails its first FAILS attempts (counted in COUNTS/<shard>.n), either
# exiting non-zero or, with MODE=truncate, sending a cut shard with exit status 0. ONLY limits the failures
# to shards whose path contains it.
FLAKY = """\
fails=$1 counts=$2 shard=$3 mode=$4 only=$5
counter="$counts/$(basename "$shard").n"
n=$(( $(cat "$counter" 2>/dev/null || echo 0) + 1 ))
echo $n > "$counter"
case "$shard" in *"$only"*) ;; *) fails=0 ;; esac
if [ "$n" -le "$fails" ]; then
  if [ "$mode" = truncate ]; then head -c 1000 "$shard"; exit 0; fi
  exit 1
fi
cat "$shard"
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """40 byte-token documents of 194-1392 tokens (35 k in all) in shards of 1-3 whole documents."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    words = ["data", "shard", "stream", "prefetch", "order", "token", "epoch", "retry", "cursor", "rank"]
    for i in range(40):
        text = " ".join(rng.choice(words, size=int(rng.integers(30, 220))))
        (root / f"doc{i:02d}.txt").write_text(text + "\n")
    prepare([str(root / f"doc{i:02d}.txt") for i in range(40)], "bytes", "webdataset", str(root / "wds"),
            shard_mb=0.007, progress=False)
    _, manifest = read_manifest(root / "wds")
    assert len(manifest["shards"]) >= 10
    return root / "wds"


def shard_pattern(dataset) -> str:
    last = len(read_manifest(dataset)[1]["shards"]) - 1
    return f"{dataset}/shard-{{000000..{last:06d}}}.tar"


def flaky_urls(dataset, tmp_path, fails: int, mode: str = "exit", only: str = "shard-") -> tuple[str, object]:
    """A ``pipe:`` URL pattern through the flaky command, and the folder where it counts attempts."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    script, counts = tmp_path / "flaky.sh", tmp_path / "counts"
    script.write_text(FLAKY)
    counts.mkdir(exist_ok=True)
    return f"pipe:sh {script} {fails} {counts} {shard_pattern(dataset)} {mode} {only}", counts


def pipeline(monkeypatch, dataset, urls=None, **reads) -> DataPipeline:
    """A one-source pipeline over ``dataset``, its WebDatasetSource built with ``reads`` (cache, prefetch, retry)."""
    def build(spec, name, cfg, bad):
        return WebDatasetSource(spec.path, name, bad, cfg.verify_checksums, spec.urls, **reads)

    monkeypatch.setattr(loader, "build_source", build)
    cfg = DataConfig(sources=[{"type": "webdataset", "name": "web", "path": str(dataset), "urls": urls}],
                     seq_len=SEQ, packing="boundaries")
    return DataPipeline(cfg, micro_batch_size=MICRO, global_batch_size=GLOBAL)


def run(data: DataPipeline, first: int, last: int, dp: int, state=None) -> list:
    """Every rank's micro-batches of steps ``first .. last - 1``, as nested lists."""
    state = state or data.initial_state()
    out = []
    for step in range(first, last):
        plan = data.plan(step, state)
        out.append([[{k: v.tolist() for k, v in mb.items()} for mb in data.micro_batches(plan, rank, dp)]
                    for rank in range(dp)])
        state = plan.next_state
    return out


def state_at(data: DataPipeline, step: int) -> dict:
    state = data.initial_state()
    for s in range(step):
        state = data.plan(s, state).next_state
    return state


def steps_past_one_epoch(data: DataPipeline) -> int:
    return data.streams[0].train.epoch_tokens // (GLOBAL * SEQ) + 4


def stream_shards(stream, epochs: int) -> list[int]:
    """The shards a stream reads over ``epochs`` epochs, in order, worked out from ``order`` alone."""
    source = stream.source
    runs = []
    for e in range(epochs):
        for doc in stream.order(e)[0]:
            shard = int(source.start_shard[doc])
            if not runs or runs[-1] != shard:
                runs.append(shard)
    return runs


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_prefetch_changes_no_batch_across_an_epoch(monkeypatch, dataset, dp):
    reference = pipeline(monkeypatch, dataset, prefetch_shards=0)
    steps = steps_past_one_epoch(reference)
    expected = run(reference, 0, steps, dp)
    pipe_cat = f"pipe:cat {shard_pattern(dataset)}"
    for urls, reads in ((None, {}), (None, {"prefetch_shards": 3, "cache_shards": 1}),
                        (pipe_cat, {"prefetch_shards": 2}), (pipe_cat, {"prefetch_shards": 0})):
        data = pipeline(monkeypatch, dataset, urls, **reads)
        assert run(data, 0, steps, dp) == expected, (urls, reads)


def test_a_resumed_or_rewound_pipeline_reads_the_same_batches(monkeypatch, dataset):
    continuous = pipeline(monkeypatch, dataset)
    steps = steps_past_one_epoch(continuous)
    expected = run(continuous, 0, steps, 2)
    k = steps // 2
    resumed = pipeline(monkeypatch, dataset, cache_shards=1)  # a fresh process: nothing loaded, nothing pending
    assert run(resumed, k, steps, 2, state_at(resumed, k)) == expected[k:]
    # the same pipeline sent back to an earlier cursor: loads started for the old position are stale
    assert run(resumed, 3, steps, 2, state_at(resumed, 3)) == expected[3:]


def test_the_next_shards_load_ahead_in_stream_order_within_the_memory_bound(monkeypatch, dataset):
    cache, depth = 1, 2
    data = pipeline(monkeypatch, dataset, cache_shards=cache, prefetch_shards=depth)
    stream = data.streams[0].train
    src = stream.source
    events, loads_on_main, in_memory = [], [], []
    background, load = src._load_in_background, src._load

    def record_start(i):
        events.append(("start", i))
        return background(i)

    def record_load(i):
        if threading.current_thread() is threading.main_thread():
            loads_on_main.append(i)
        in_memory.append(len(src._cache) + len(src._pending) + (i not in src._pending))  # this one included
        return load(i)

    src._load_in_background, src._load = record_start, record_load
    order = stream_shards(stream, 3)  # the reference: shards in reading order, worked out from `order`
    reached = []
    for pos in range(0, stream.epoch_tokens * 3 // 2, SEQ):
        epoch, q = divmod(pos, stream.epoch_tokens)
        docs, ends = stream.order(epoch)
        shard = int(src.shards_of(docs[np.searchsorted(ends, q, side="right")]))
        if not reached or reached[-1] != shard:
            reached.append(shard)
            events.append(("reach", shard))
        ahead = []
        for s in order[len(reached):]:
            if len(ahead) == depth:
                break
            if s != shard and s not in ahead:
                ahead.append(s)
        assert stream.upcoming_shards(pos, depth) == ahead
        stream.window(pos, SEQ + 1)
        assert set(ahead) <= set(src._cache) | set(src._pending)  # the next shards are held or on their way
        assert len(src._cache) + len(src._pending) <= cache + depth
    assert reached == order[:len(reached)] and len(set(reached)) < len(reached)  # into the second epoch
    # each shard the stream entered, but the first, had its load started at an earlier window; none on demand
    starts, reaches = {}, {}
    for kind, s in events[1:]:
        counts = starts if kind == "start" else reaches
        counts[s] = counts.get(s, 0) + 1
        if kind == "reach":
            assert starts.get(s, 0) >= reaches[s], (s, events)
    assert loads_on_main == reached[:1]
    assert max(in_memory) <= cache + depth


def test_a_flaky_command_succeeds_after_retries_and_they_are_counted(monkeypatch, dataset, tmp_path):
    sleeps = []
    monkeypatch.setattr(sources, "pause_before_retry", sleeps.append)
    reference = pipeline(monkeypatch, dataset, prefetch_shards=0)
    for mode in ("exit", "truncate"):  # a failed command, or a cut transfer caught by the checksum
        urls, counts = flaky_urls(dataset, tmp_path / mode, fails=2, mode=mode)
        data = pipeline(monkeypatch, dataset, urls, retry_delay=0.25)
        sleeps.clear()
        # one rank: ranks simulated in one process would share the source, and each rank's prefetch drops the
        # finished loads the other one started (a real rank has a source of its own), so a shard could be read twice
        assert run(data, 0, 6, 1) == run(reference, 0, 6, 1)
        data.streams[0].source.wait_for_loads_ahead()  # counts taken next include them
        attempts = [int(f.read_text()) for f in counts.iterdir()]
        assert attempts and set(attempts) == {3}  # two failures, then the read that worked
        stats = data.read_stats()
        assert stats["data_retries/web"] == 2 * len(attempts)
        assert sorted(sleeps) == sorted([0.25, 0.5] * len(attempts))  # backoff doubles


def test_a_command_that_always_fails_gives_one_line_after_the_last_attempt(monkeypatch, dataset, tmp_path):
    sleeps = []
    monkeypatch.setattr(sources, "pause_before_retry", sleeps.append)
    urls, counts = flaky_urls(dataset, tmp_path, fails=99)
    source = WebDatasetSource(str(dataset), "web", BadData(), urls=urls, read_attempts=3, retry_delay=0.1)
    with pytest.raises(UserError) as e:
        source.read(0)
    message = str(e.value)
    assert "\n" not in message and "shard-000000.tar" in message and "gave up after 3 attempts" in message
    assert (counts / "shard-000000.tar.n").read_text().strip() == "3"
    assert sleeps == [0.1, 0.2] and source.read_stats.retries == 2


def test_a_failed_load_ahead_stops_the_run_only_when_the_stream_reaches_its_shard(monkeypatch, dataset, tmp_path):
    monkeypatch.setattr(sources, "pause_before_retry", lambda s: None)
    reference = pipeline(monkeypatch, dataset, prefetch_shards=0).streams[0].train
    bad = stream_shards(reference, 1)[2]
    urls, counts = flaky_urls(dataset, tmp_path, fails=99, only=f"shard-{bad:06d}.tar")
    stream = pipeline(monkeypatch, dataset, urls, prefetch_shards=2).streams[0].train
    pos = 0
    while True:
        expected = reference.window(pos, SEQ + 1)
        if bad in stream.source.shards_of(expected.sample_ids % stream.num_docs):
            break
        assert np.array_equal(stream.window(pos, SEQ + 1).tokens, expected.tokens)  # good shards read right
        pos += SEQ
    assert (counts / f"shard-{bad:06d}.tar.n").is_file()  # its load was started ahead, and failed
    with pytest.raises(UserError, match=f"shard-{bad:06d}.tar .*gave up after 4 attempts"):
        stream.window(pos, SEQ + 1)


def test_a_corrupt_local_shard_fails_at_once(monkeypatch, dataset, tmp_path):
    sleeps = []
    monkeypatch.setattr(sources, "pause_before_retry", sleeps.append)
    copy = tmp_path / "wds"
    shutil.copytree(dataset, copy)
    shard = copy / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600:610] = b"\xff" * 10  # same size, wrong bytes: passes the size check when the source opens
    shard.write_bytes(bytes(data))
    source = WebDatasetSource(str(copy), "web", BadData())
    first = int(np.flatnonzero(source.start_shard == 1)[0])  # the first document that starts in shard 1
    with pytest.raises(UserError, match="shard-000001.tar does not match its manifest checksum") as e:
        source.read(first)
    assert "attempts" not in str(e.value) and sleeps == [] and source.read_stats.retries == 0


def test_read_stats_count_the_bytes_of_the_shards_read_since_the_last_call(monkeypatch, dataset):
    data = pipeline(monkeypatch, dataset, cache_shards=32)  # room for every shard: each is read once
    src = data.streams[0].source
    loaded, load = [], src._load
    src._load = lambda i: (loaded.append(i), load(i))[1]
    steps = data.streams[0].train.epoch_tokens // (GLOBAL * SEQ)
    run(data, 0, steps, 1)
    data.streams[0].source.wait_for_loads_ahead()
    shards = read_manifest(dataset)[1]["shards"]
    stats = data.read_stats()
    assert set(stats) == {f"data_{k}/web" for k in ("read_mb", "read_s", "read_mb_s", "retries", "wait_s")}
    assert len(loaded) == len(set(loaded))
    assert stats["data_read_mb/web"] * 1e6 == pytest.approx(sum(shards[i]["bytes"] for i in loaded))
    assert stats["data_read_s/web"] > 0 and stats["data_retries/web"] == 0 and stats["data_wait_s/web"] >= 0
    assert stats["data_read_mb_s/web"] == pytest.approx(stats["data_read_mb/web"] / stats["data_read_s/web"])
    assert data.read_stats() == dict.fromkeys(stats, 0.0)  # nothing read since
    monkeypatch.undo()  # the loader's own build_source again
    assert DataPipeline(DataConfig(seq_len=32), 2, 8).read_stats() == {}  # the built-in corpus reads no shards


def test_webdataset_is_imported_before_any_load_can_start_on_a_thread(dataset):
    """Two threads importing one package at once can see it half-initialised (a KeyError or ImportError in one
    run in five before the fix): the source imports what its loads need when it is built, in the caller's thread."""
    script = (
        "import sys\n"
        "from chimera.data.readers import BadData\n"
        "from chimera.data.sources import WebDatasetSource\n"
        "assert 'webdataset' not in sys.modules\n"
        f"source = WebDatasetSource({str(dataset)!r}, 'web', BadData())\n"
        "assert {'webdataset.gopen', 'webdataset.tariterators'} <= set(sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
