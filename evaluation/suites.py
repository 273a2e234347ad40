"""The evaluation suites of ``chimera eval``: each takes a loaded model (``EvalTarget``) and its options, and
returns a result: ``{"suite", "metric", "rows": [...], "summary": {...}}`` (rows print as a table).

* ``ppl``: streaming loss, perplexity and (byte tokenizer) bits per byte over the run's held-out split, or over
  every document of a prepared dataset (``data``), with the number of tokens evaluated;
* ``mqar``: Zoology's per-query exact match over a grid of sequence lengths x key-value counts;
* ``chomsky``: per-task accuracy on the test lengths (41-500 by default), which must be disjoint from the lengths
  the run trained on (Deletang et al. 2023: train on 1-40, test on 41-500);
* ``longctx``: loss and accuracy against evaluation length, on the task the run trained on (its first source).

Samples are drawn from ``EVAL_SEED`` streams, never the training stream (seed ``data.seed``), so no evaluated
instance is a training sample by construction of its index.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pydantic import Field

from chimera.configs.section import Section
from chimera.data import IGNORE_INDEX
from chimera.errors import UserError
from chimera.evaluation.ranks import mine, sum_over_ranks
from chimera.evaluation.scoring import Tally, model_logits, per_row_accuracy, score
from chimera.evaluation.target import EvalTarget

EVAL_SEED = 0xE7A1  # the eval streams' seed (training uses data.seed with sample indices 0, 1, ...)
TOKENS_PER_BATCH = 16384  # positions per forward pass: rows = max(1, this // length)


def _rows_per_batch(length: int) -> int:
    return max(1, TOKENS_PER_BATCH // max(1, length))


def _batched(items: list, size: int):
    """This rank's batches of ``size`` items (all of them on one process; see ``chimera.evaluation.ranks``)."""
    yield from mine(items[i:i + size] for i in range(0, len(items), size))


def _score_samples(model, samples: list[tuple[np.ndarray, np.ndarray]], unscored: tuple[int, ...] = ()) -> Tally:
    """The tally over (inputs, labels) samples of one length, in batches."""
    total = Tally()
    if not samples:
        return total  # the same on every rank: no sums to add
    for chunk in _batched(samples, _rows_per_batch(len(samples[0][0]))):
        inputs = torch.from_numpy(np.stack([s[0] for s in chunk]))
        labels = torch.from_numpy(np.stack([s[1] for s in chunk]))
        total.add(score(model_logits(model, inputs), labels, unscored))
    return total.over_ranks()


def _check_vocab(task, target: EvalTarget, what: str) -> None:
    if task.vocab_size > target.vocab_size:
        raise UserError(f"{what}: the task needs {task.vocab_size} token ids but the model's vocabulary holds "
                        f"{target.vocab_size} (model.vocab_size); lower the task's vocab_size or evaluate a model "
                        "trained on it")


def _synthetic_sources(target: EvalTarget, kind: Callable[[str], bool]) -> list:
    return [s for s in target.run.data.sources if s.type == "synthetic" and kind(s.task)]


def _make(name: str, options: dict, what: str):
    from chimera.data.synthetic import make_task

    try:
        return make_task(name, **options)
    except (TypeError, ValueError) as e:
        raise UserError(f"{what}: {e}") from None


# ---------------------------------------------------------------------------------------------------
# ppl
# ---------------------------------------------------------------------------------------------------


class PplOptions(Section):
    data: str | None = Field(None, description="a prepared dataset (webdataset or zarr directory): every document "
                             "of it is evaluated; default: the held-out split of the run's text sources")
    seq_len: int | None = Field(None, ge=2, description="window length (default: the run's data.seq_len)")
    max_tokens: int = Field(1_000_000, ge=1, description="stop after this many evaluated tokens per source")


def _text_streams(target: EvalTarget, opts: PplOptions) -> list[tuple[str, Any]]:
    """(name, TokenStream) of each stream evaluated, in order."""
    from chimera.data.loader import TextStreams, build_source
    from chimera.data.readers import BadData
    from chimera.data.stream import TokenStream
    from chimera.data.tokenizers import get_tokenizer

    data = target.run.data
    if opts.data is not None:
        from pathlib import Path

        from chimera.data.dataset_files import read_manifest
        from chimera.data.sources import WebDatasetSource, ZarrSource

        _, manifest = read_manifest(opts.data)  # not a dataset: a UserError naming it
        cls = {"webdataset": WebDatasetSource, "zarr": ZarrSource}.get(manifest.get("format"))
        if cls is None:
            raise UserError(f"ppl: data={opts.data!r} holds format {manifest.get('format')!r}; "
                            "expected webdataset or zarr")
        source = cls(opts.data, Path(opts.data).name, BadData("fail"), True)
        ours = get_tokenizer(data.tokenizer).identity()
        if source.tokenizer_identity != ours:
            raise UserError(f"ppl: {opts.data} was prepared with tokenizer {source.tokenizer_identity.get('name')!r} "
                            f"but the model was trained with {data.tokenizer!r}; evaluate data prepared with it")
        return [(source.name, TokenStream(source, source.groups, data.seed, shuffle=False, prefetch=False))]
    cfg = data.model_copy(update={"seq_len": opts.seq_len or data.seq_len})
    streams = []
    for spec, name in zip(cfg.sources, cfg.source_names()):
        if spec.type != "synthetic":
            streams.append((name, TextStreams(build_source(spec, name, cfg, BadData("fail")), cfg).validation))
    if not streams:
        raise UserError("ppl: the run trained on synthetic tasks only; use --suite mqar, chomsky or longctx, or "
                        "pass --set data=DIR (a prepared dataset)")
    return streams


def ppl(target: EvalTarget, opts: PplOptions) -> dict:
    """Non-overlapping windows of ``seq_len + 1`` tokens from the start of each stream: the model predicts the
    last ``seq_len`` of each from the ones before (a window's first token is predicted by none)."""
    from chimera.data.tokenizers import get_tokenizer

    tokenizer = get_tokenizer(target.run.data.tokenizer)
    byte_level = target.run.data.tokenizer == "bytes"
    length = opts.seq_len or target.run.data.seq_len
    rows = []
    for name, stream in _text_streams(target, opts):
        windows = min(stream.epoch_tokens - 1, opts.max_tokens) // length
        if windows < 1:
            raise UserError(f"ppl: source {name!r} holds {stream.epoch_tokens} tokens, fewer than one window of "
                            f"{length + 1}; lower --set seq_len")
        tally, text_bytes = Tally(), 0
        for first in mine(range(0, windows, _rows_per_batch(length))):
            tokens = np.stack([stream.window(i * length, length + 1).tokens
                               for i in range(first, min(windows, first + _rows_per_batch(length)))]).astype(np.int64)
            inputs, labels = torch.from_numpy(tokens[:, :-1]), torch.from_numpy(tokens[:, 1:])
            tally.add(score(model_logits(target.model, inputs), labels))
            text_bytes += int((labels != tokenizer.eos_id).sum())
        tally = tally.over_ranks()
        text_bytes = int(sum_over_ranks([text_bytes])[0])
        row = {"source": name, "tokens": tally.positions, "loss": tally.loss, "perplexity": math.exp(tally.loss),
               "accuracy": tally.accuracy}
        if byte_level:  # the separators between documents are tokens, not bytes of text
            row["bits_per_byte"] = tally.loss_nats / math.log(2) / max(1, text_bytes)
        rows.append(row)
    total = sum(r["tokens"] for r in rows)
    loss = sum(r["loss"] * r["tokens"] for r in rows) / total
    return {"suite": "ppl", "metric": "loss", "rows": rows,
            "summary": {"loss": loss, "perplexity": math.exp(loss), "tokens": total}}


# ---------------------------------------------------------------------------------------------------
# mqar
# ---------------------------------------------------------------------------------------------------


class MqarOptions(Section):
    seq_lens: list[int] | None = Field(None, description="sequence lengths (default: the run's MQAR seq_len)")
    kv_pairs: list[int] | None = Field(None, description="key-value counts (default: the run's num_kv_pairs)")
    vocab_size: int | None = Field(None, ge=4, description="the task's vocab (default: the run's MQAR vocab)")
    samples: int = Field(256, ge=1, description="instances per grid cell")


def mqar_options_of(target: EvalTarget) -> dict:
    """The MQAR options the run trained with (its first MQAR source), with the task's defaults filled in."""
    found = _synthetic_sources(target, lambda t: t == "mqar")
    options = {"seq_len": target.run.data.seq_len, **(found[0].options if found else {})}
    from chimera.data.synthetic import MQAR

    defaults = MQAR()
    return {"vocab_size": options.get("vocab_size", defaults.vocab_size), "seq_len": options["seq_len"],
            "num_kv_pairs": options.get("num_kv_pairs", defaults.num_kv_pairs),
            "power_a": options.get("power_a", defaults.power_a),
            "random_non_queries": options.get("random_non_queries", defaults.random_non_queries)}


def mqar_accuracy(model, task, samples: int, seed: int = EVAL_SEED) -> Tally:
    """Per-query exact match of ``model`` on ``samples`` instances of an ``MQAR`` task."""
    from chimera.data.synthetic import sample_at

    stream = seed * 1_000_003 + task.seq_len * 1009 + task.num_kv_pairs  # one stream per grid cell
    return _score_samples(model, [sample_at(task, stream, i) for i in range(samples)])


def mqar(target: EvalTarget, opts: MqarOptions) -> dict:
    trained = mqar_options_of(target)
    if opts.vocab_size:
        trained["vocab_size"] = opts.vocab_size
    seq_lens = opts.seq_lens or [trained["seq_len"]]
    kv_pairs = opts.kv_pairs or [trained["num_kv_pairs"]]
    rows, skipped = [], []
    for length in seq_lens:
        for kv in kv_pairs:
            options = {**trained, "seq_len": length, "num_kv_pairs": kv}
            try:
                from chimera.data.synthetic import MQAR

                task = MQAR(**options)
            except ValueError as e:
                skipped.append(f"seq_len {length}, kv {kv}: {e}")
                continue
            _check_vocab(task, target, "mqar")
            tally = mqar_accuracy(target.model, task, opts.samples)
            rows.append({"seq_len": length, "kv_pairs": kv, "queries": tally.positions, "accuracy": tally.accuracy,
                         "loss": tally.loss})
    if not rows:
        raise UserError(f"mqar: no grid cell is a valid MQAR task ({skipped[0]}); choose seq_lens and kv_pairs with "
                        "4 * kv_pairs <= seq_len < vocab_size")
    mean = sum(r["accuracy"] for r in rows) / len(rows)
    return {"suite": "mqar", "metric": "accuracy", "rows": rows, "skipped": skipped,
            "summary": {"accuracy": mean, "vocab_size": trained["vocab_size"]}}


# ---------------------------------------------------------------------------------------------------
# chomsky
# ---------------------------------------------------------------------------------------------------


class ChomskyOptions(Section):
    tasks: list[str] | None = Field(None, description="Chomsky tasks (default: those the run trained on)")
    test_lengths: tuple[int, int] = Field((41, 500), description="inclusive range of test input lengths")
    num_lengths: int = Field(16, ge=1, description="lengths evaluated, evenly spread over the range (ends included)")
    samples: int = Field(8, ge=1, description="instances per length")
    train_lengths_checked: int = Field(4, ge=0, description="also score this many training lengths (evenly spread "
                                       "over the training range; 0: none): in-distribution accuracy, for contrast")


def length_grid(test_lengths: tuple[int, int], num_lengths: int) -> list[int]:
    lo, hi = test_lengths
    return sorted({int(round(x)) for x in np.linspace(lo, hi, min(num_lengths, hi - lo + 1))})


def chomsky_task_options(target: EvalTarget, name: str) -> dict:
    """The options the run trained task ``name`` with (empty when it did not train on it)."""
    found = [s for s in _synthetic_sources(target, lambda t: t == name)]
    return {k: v for k, v in (found[0].options if found else {}).items() if k not in ("seq_len", "split")}


def _output_scores(model, task, lengths: list[int], samples: int, seed: int) -> list[dict]:
    """Per length: token accuracy on the output (EOS left out: the paper has none), whole-output accuracy and
    loss, over ``samples`` instances."""
    out = []
    for length in lengths:
        rng = np.random.default_rng([seed, length])
        pairs = [task.sample(rng, length) for _ in range(samples)]
        used = max(int((p[1] != IGNORE_INDEX).nonzero()[0].max()) + 2 for p in pairs)  # the rest is padding
        pairs = [(i[:used], lab[:used]) for i, lab in pairs]
        accs, tally = [], Tally()
        for chunk in _batched(pairs, _rows_per_batch(used)):
            inputs = torch.from_numpy(np.stack([p[0] for p in chunk]))
            labels = torch.from_numpy(np.stack([p[1] for p in chunk]))
            logits = model_logits(model, inputs)
            accs += per_row_accuracy(logits, labels, (task.eos_id,))
            tally.add(score(logits, labels, (task.eos_id,)))
        scored = [a for a in accs if a is not None]  # an empty output (stack_manipulation) scores nothing
        tally = tally.over_ranks()
        total, exact, instances = sum_over_ranks([sum(scored), sum(a == 1.0 for a in scored), len(scored)])
        out.append({"length": length, "accuracy": total / instances if instances else float("nan"),
                    "sequence_accuracy": exact / instances if instances else float("nan"),
                    "loss": tally.loss, "instances": int(instances)})
    return out


def chomsky(target: EvalTarget, opts: ChomskyOptions) -> dict:
    from chimera.data.synthetic import CHOMSKY_TASKS

    names = opts.tasks or [s.task for s in _synthetic_sources(target, lambda t: t in CHOMSKY_TASKS)]
    if not names:
        raise UserError("chomsky: the run trained on no Chomsky task; name them with --set tasks=[parity_check,...] "
                        f"(known: {', '.join(CHOMSKY_TASKS)})")
    unknown = [n for n in names if n not in CHOMSKY_TASKS]
    if unknown:
        raise UserError(f"chomsky: unknown task {unknown[0]!r}; known: {', '.join(CHOMSKY_TASKS)}")
    rows, per_length = [], {}
    for name in names:
        options = chomsky_task_options(target, name)
        train_lengths = tuple(options.get("train_lengths", (1, 40)))
        lo, hi = opts.test_lengths
        if lo <= train_lengths[1] and train_lengths[0] <= hi:
            raise UserError(f"chomsky: test lengths {opts.test_lengths} overlap the lengths {train_lengths} task "
                            f"{name} was trained on; choose test lengths above {train_lengths[1]}")
        task = _make(name, {**options, "train_lengths": train_lengths, "test_lengths": opts.test_lengths,
                            "split": "test"}, f"chomsky ({name})")
        _check_vocab(task, target, f"chomsky ({name})")
        lengths = length_grid(opts.test_lengths, opts.num_lengths)
        scores = _output_scores(target.model, task, lengths, opts.samples, EVAL_SEED)
        per_length[name] = scores
        valid = [s for s in scores if not math.isnan(s["accuracy"])]
        row = {"task": name, "level": task.level, "train_lengths": list(train_lengths),
               "test_lengths": list(opts.test_lengths),
               "accuracy": float(np.mean([s["accuracy"] for s in valid])),
               "sequence_accuracy": float(np.mean([s["sequence_accuracy"] for s in valid])),
               "lengths_evaluated": len(valid)}
        if opts.train_lengths_checked:
            seen = _make(name, {**options, "train_lengths": train_lengths}, f"chomsky ({name})")
            inside = _output_scores(target.model, seen, length_grid(train_lengths, opts.train_lengths_checked),
                                    opts.samples, EVAL_SEED + 2)
            row["train_length_accuracy"] = float(np.nanmean([s["accuracy"] for s in inside]))
        rows.append(row)
    return {"suite": "chomsky", "metric": "accuracy", "rows": rows, "per_length": per_length,
            "summary": {"accuracy": float(np.mean([r["accuracy"] for r in rows]))}}


# ---------------------------------------------------------------------------------------------------
# longctx
# ---------------------------------------------------------------------------------------------------


class LongctxOptions(Section):
    lengths: list[int] = Field(default_factory=lambda: [128, 256, 512, 1024, 2048], description="evaluation lengths")
    samples: int = Field(16, ge=1, description="sequences (synthetic instances) per length")


def longctx(target: EvalTarget, opts: LongctxOptions) -> dict:
    """The run's training task at each length: MQAR with its key-value count kept and the sequence (the gaps
    between keys and queries) longer; a Chomsky task at the longest input that fits the length; text: windows of
    the held-out split of that length. Accuracy: exact match on the scored positions."""
    from chimera.data.synthetic import CHOMSKY_TASKS, MQAR

    sources = target.run.data.sources
    first = sources[0]
    rows = []
    for length in sorted(opts.lengths):
        if first.type != "synthetic":
            result = ppl(target, PplOptions(seq_len=length, max_tokens=opts.samples * length))
            row = {"length": length, "loss": result["summary"]["loss"], "accuracy": result["rows"][0]["accuracy"],
                   "tokens": result["summary"]["tokens"]}
        elif first.task == "mqar":
            options = {**mqar_options_of(target), "seq_len": length}
            try:
                task = MQAR(**options)
            except ValueError as e:
                raise UserError(f"longctx: length {length}: {e}; drop the length or train with a larger MQAR "
                                "vocab_size") from None
            _check_vocab(task, target, "longctx (mqar)")
            tally = mqar_accuracy(target.model, task, opts.samples)
            row = {"length": length, "loss": tally.loss, "accuracy": tally.accuracy, "tokens": tally.positions}
        elif first.task in CHOMSKY_TASKS:
            options = chomsky_task_options(target, first.task)
            probe = _make(first.task, {**options, "test_lengths": (1, 1), "split": "test"}, "longctx")
            n = max((k for k in range(1, length) if probe.required_seq_len(k) <= length), default=None)
            if n is None:
                raise UserError(f"longctx: length {length} holds no {first.task} instance; use longer lengths")
            task = _make(first.task, {**options, "test_lengths": (n, n), "split": "test", "seq_len": length},
                         "longctx")
            _check_vocab(task, target, f"longctx ({first.task})")
            scores = _output_scores(target.model, task, [n], opts.samples, EVAL_SEED + 1)[0]
            row = {"length": length, "input_length": n, "loss": scores["loss"], "accuracy": scores["accuracy"],
                   "tokens": scores["instances"]}
        else:
            raise UserError(f"longctx: no long-context evaluation for task {first.task!r}")
        rows.append(row)
    return {"suite": "longctx", "metric": "accuracy", "rows": rows,
            "summary": {"accuracy": rows[-1]["accuracy"], "loss": rows[-1]["loss"], "longest": rows[-1]["length"]}}


SUITES: dict[str, tuple[Callable[[EvalTarget, Any], dict], type[Section]]] = {
    "ppl": (ppl, PplOptions), "mqar": (mqar, MqarOptions), "chomsky": (chomsky, ChomskyOptions),
    "longctx": (longctx, LongctxOptions),
}


def run_suite(name: str, target: EvalTarget, options: dict | None = None) -> dict:
    """Suite ``name`` on ``target`` with ``options`` (validated against the suite's options; a bad one is a
    ``UserError`` naming it)."""
    from chimera.configs.loader import validated

    if name not in SUITES:
        raise UserError(f"unknown eval suite {name!r}; choose one of {', '.join(SUITES)}")
    run, schema = SUITES[name]
    opts = validated(schema, options or {}, prefix=f"{name} option ")
    with torch.no_grad():
        result = run(target, opts)
    result["target"] = target.describe()
    result["options"] = opts.model_dump(mode="json")
    return result
