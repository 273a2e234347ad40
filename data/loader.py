"""The data path of a run: sources -> token streams -> mixture -> curriculum -> this rank's micro-batches.

The loader's state is a few integers, saved in every checkpoint:
``{"sequences": global sequences consumed, "cursors": {source: tokens consumed}}``.
A step's batch is a pure function of (config, state, step), so a resumed run continues with the
next global sample, whatever the number of data-parallel ranks.

A step's sequences: the step's ``G`` sequences (``G = tokens per step / L``) are numbered ``n .. n + G - 1``
in the run; sequence ``n`` comes from the source drawn from ``(seed, n)`` with the configured
weights, and takes the next ``L + 1``-token window of that source's stream. The ``G`` sequences are
laid out as ``[accumulation micro-step][data rank][row]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from chimera.configs.schema import DataConfig
from chimera.data.curriculum import SeqLenSchedule
from chimera.data.readers import BadData
from chimera.data.stream import TokenStream
from chimera.errors import UserError


def build_source(spec, name: str, cfg: DataConfig, bad: BadData):
    from chimera.data import sources
    from chimera.data.tokenizers import get_tokenizer

    if spec.type == "builtin":
        return sources.BuiltinSource(get_tokenizer(cfg.tokenizer), spec.include_tests, name)
    if spec.type == "webdataset":
        return sources.WebDatasetSource(spec.path, name, bad, cfg.verify_checksums, spec.urls,
                                        cache_shards=spec.cache_shards, prefetch_shards=spec.prefetch_shards,
                                        read_attempts=spec.read_attempts, retry_delay=spec.retry_delay)
    if spec.type == "zarr":
        return sources.ZarrSource(spec.path, name, bad, cfg.verify_checksums)
    raise ValueError(spec.type)


class TextStreams:
    """A document source's train and validation streams."""

    kind = "text"

    def __init__(self, source, cfg: DataConfig):
        from chimera.data.sources import splittable

        source = splittable(source, cfg.val_fraction, cfg.seq_len)  # few long documents: cut into windows
        self.source, self.name = source, source.name
        train_groups, val_ids = source.split_ids(cfg.val_fraction)
        self.train = TokenStream(source, train_groups, cfg.seed)
        self.validation = TokenStream(source, [val_ids], cfg.seed, shuffle=False, prefetch=False)
        self.vocab_size = source.vocab_size

    def sequence(self, stream: TokenStream, start: int, length: int, boundaries: bool) -> dict:
        w = stream.window(start, length + 1)
        out = {"input_ids": w.tokens[:-1], "labels": w.tokens[1:]}
        if boundaries:
            out["segment_ids"] = w.segments()[:-1]
            out["position_ids"] = w.offsets[:-1]
        return out


class SyntheticStreams:
    """A generated task: sequence ``i`` is ``sample_at(task, seed, i)``; validation draws the test lengths."""

    kind = "synthetic"

    def __init__(self, spec, name: str, cfg: DataConfig):
        from chimera.data.synthetic import ChomskyTask, make_task

        self.name = name
        options = {"seq_len": cfg.seq_len, **spec.options}
        try:
            self.task = make_task(spec.task, **options)
            # validation: the Chomsky tasks' test lengths (length generalisation); MQAR: unseen samples
            # (its sequences are as long as the longest test instance needs, not data.seq_len)
            self.test_task = make_task(spec.task, **{**spec.options, "split": "test"}) \
                if isinstance(self.task, ChomskyTask) else self.task
        except (TypeError, ValueError) as e:
            raise UserError(f"data.sources[{name}] ({spec.task}): {e}") from None
        self.vocab_size = self.task.vocab_size
        self.seed = cfg.seed

    def sample(self, task, index: int) -> dict:
        from chimera.data.synthetic import sample_at

        inputs, labels = sample_at(task, self.seed, index)
        return {"input_ids": inputs, "labels": labels}


@dataclass
class StepPlan:
    step: int
    seq_len: int
    rows: int  # sequences per micro-batch
    sources: np.ndarray  # [G] source index of each of the step's sequences
    starts: np.ndarray  # [G] cursor (text: token offset, synthetic: sample index) of each sequence
    next_state: dict
    log: dict = field(default_factory=dict)


class DataPipeline:
    def __init__(self, cfg: DataConfig, micro_batch_size: int, global_batch_size: int):
        self.cfg = cfg
        self.bad = BadData(cfg.on_error)
        names = cfg.source_names()
        self.streams = []
        for spec, name in zip(cfg.sources, names):
            if spec.type == "synthetic":
                self.streams.append(SyntheticStreams(spec, name, cfg))
            else:
                self.streams.append(TextStreams(build_source(spec, name, cfg, self.bad), cfg))
        self.names = names
        weights = np.array([s.weight for s in cfg.sources], dtype=np.float64)
        self.cum_weights = np.cumsum(weights / weights.sum())
        self.schedule = SeqLenSchedule(micro_batch_size * cfg.seq_len, cfg.seq_len, cfg.curriculum)
        self.tokens_per_step = global_batch_size * cfg.seq_len
        self.vocab_size = max(s.vocab_size for s in self.streams)
        self._read_totals: dict[str, dict] = {}  # read_stats() at its previous call, by source
        self._check_tokenizers()

    def _check_tokenizers(self) -> None:
        """Prepared sources carry their tokenizer's identity; it must be the run's ``data.tokenizer``."""
        from chimera.data.tokenizers import get_tokenizer

        ours = get_tokenizer(self.cfg.tokenizer).identity()
        for s in self.streams:
            theirs = getattr(getattr(s, "source", None), "tokenizer_identity", None)
            if theirs is not None and theirs != ours:
                raise UserError(f"source {s.name!r} was prepared with tokenizer {theirs['name']!r} "
                                f"but data.tokenizer is {self.cfg.tokenizer!r} ({ours['name']!r}); set data.tokenizer "
                                "to the tokenizer the data was prepared with")

    def initial_state(self) -> dict:
        return {"sequences": 0, "cursors": {n: 0 for n in self.names}}

    def windowed_sources(self) -> dict:
        """Sources whose documents were cut into windows for the train/validation split: how (recorded in the run)."""
        return {s.name: s.source.describe() for s in self.streams if s.kind == "text" and hasattr(s.source, "describe")}

    def excluded_documents(self) -> dict:
        return {s.name: s.source.excluded for s in self.streams if s.kind == "text" and s.source.excluded}

    def read_stats(self) -> dict[str, float]:
        """What reading shards cost this rank since the previous call (the first call: since the start), for each
        source that reads shards (WebDataset): ``data_read_mb/<source>`` (10^6 bytes read, retries included),
        ``data_read_s/<source>`` (seconds those reads took, summed over prefetch threads), ``data_read_mb_s/<source>``
        (the two's ratio: the rate of one read; 0 without reads), ``data_retries/<source>`` (attempts repeated)
        and ``data_wait_s/<source>`` (seconds the step loop waited for shards: the reading prefetch did not hide)."""
        out = {}
        for s in self.streams:
            stats = getattr(getattr(s, "source", None), "read_stats", None)
            if stats is None:
                continue
            now = stats.totals()
            before = self._read_totals.get(s.name, dict.fromkeys(now, 0))
            self._read_totals[s.name] = now
            d = {k: now[k] - before[k] for k in now}
            out[f"data_read_mb/{s.name}"] = d["bytes"] / 1e6
            out[f"data_read_s/{s.name}"] = d["seconds"]
            out[f"data_read_mb_s/{s.name}"] = d["bytes"] / 1e6 / d["seconds"] if d["seconds"] > 0 else 0.0
            out[f"data_retries/{s.name}"] = float(d["retries"])
            out[f"data_wait_s/{s.name}"] = d["wait_seconds"]
        return out

    def _choose(self, n: int) -> int:
        if len(self.streams) == 1:
            return 0
        u = np.random.default_rng([self.cfg.seed, 0x5EED, n]).random()
        return int(np.searchsorted(self.cum_weights, u, side="right"))

    def plan(self, step: int, state: dict) -> StepPlan:
        """Which sequences the step after ``step`` completed steps reads; the state after it."""
        seq_len = self.schedule.at(step)
        count = self.tokens_per_step // seq_len
        n0 = state["sequences"]
        chosen = np.array([self._choose(n0 + j) for j in range(count)], dtype=np.int64)
        cursors = dict(state["cursors"])
        starts = np.empty(count, dtype=np.int64)
        log = {"seq_len": seq_len, "source_sequences": {}, "samples": {}}
        for i, stream in enumerate(self.streams):
            mine = np.flatnonzero(chosen == i)
            step_size = seq_len if stream.kind == "text" else 1
            begin = cursors[stream.name]
            starts[mine] = begin + step_size * np.arange(len(mine))
            cursors[stream.name] = begin + step_size * len(mine)
            if len(mine):
                log["source_sequences"][stream.name] = int(len(mine))
                if stream.kind == "text":
                    log["samples"][stream.name] = stream.train.started_samples(begin, cursors[stream.name])
                else:
                    log["samples"][stream.name] = list(range(begin, cursors[stream.name]))
        next_state = {"sequences": n0 + count, "cursors": cursors}
        return StepPlan(step, seq_len, self.schedule.rows(step), chosen, starts, next_state, log)

    def micro_batches(self, plan: StepPlan, data_rank: int, data_size: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the step, each ``{input_ids, labels[, segment_ids, position_ids]}``."""
        per_micro = plan.rows * data_size
        boundaries = self.cfg.packing == "boundaries"
        batches = []
        for m in range(len(plan.sources) // per_micro):
            rows = []
            for j in range(m * per_micro + data_rank * plan.rows, m * per_micro + (data_rank + 1) * plan.rows):
                stream = self.streams[plan.sources[j]]
                if stream.kind == "text":
                    rows.append(stream.sequence(stream.train, int(plan.starts[j]), plan.seq_len, boundaries))
                else:
                    rows.append(stream.sample(stream.task, int(plan.starts[j])))
            batches.append(_collate(rows))
        return batches

    def validation_batches(self, source: int, num_batches: int, data_rank: int, data_size: int, rows: int):
        """``num_batches`` global batches of validation sequences of one source (``global_batch_size`` sequences
        each), spread evenly over its validation stream: a fixed set whatever the layout. This rank's share, as
        micro-batches of ``rows`` sequences, laid out like a training step's."""
        stream, length = self.streams[source], self.cfg.seq_len
        boundaries = self.cfg.packing == "boundaries"
        per_batch = self.tokens_per_step // length
        total = num_batches * per_batch
        for micro in range(num_batches * per_batch // (rows * data_size)):
            first = (micro * data_size + data_rank) * rows
            if stream.kind == "text":
                span = max(0, stream.validation.epoch_tokens - length - 1)
                seqs = [stream.sequence(stream.validation, (first + i) * span // total, length, boundaries)
                        for i in range(rows)]
            else:
                seqs = [stream.sample(stream.test_task, 1_000_000_000 + first + i) for i in range(rows)]
            yield _collate(seqs)

    @functools.cache  # noqa: B019 (one pipeline per run)
    def unigram_cross_entropy(self) -> float | None:
        """Validation loss of the best context-free model of the first text source (nats/token)."""
        text = [s for s in self.streams if s.kind == "text"]
        if not text:
            return None
        s = text[0]
        sample = lambda stream: stream.window(0, min(stream.epoch_tokens, 2_000_000)).tokens  # noqa: E731
        counts = np.bincount(sample(s.train), minlength=s.vocab_size).astype(np.float64) + 1
        logp = np.log(counts / counts.sum())
        return float(-logp[sample(s.validation)].mean())


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([r[k] for r in rows]).astype(np.int64)) for k in rows[0]}
