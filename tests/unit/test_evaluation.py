"""Evaluation: the scores against hand-computed cases, the Chomsky test split against the training lengths,
``ppl`` against the loss computed directly, and width solving against the target counts (meta-device counts)."""

import math

import numpy as np
import pytest
import torch

from chimera.configs.loader import load_model_config
from chimera.data import IGNORE_INDEX
from chimera.data.synthetic import MQAR, make_task
from chimera.errors import UserError
from chimera.evaluation.scoring import per_row_accuracy, score
from chimera.evaluation.suites import (
    ChomskyOptions,
    PplOptions,
    _text_streams,
    chomsky,
    length_grid,
    mqar_accuracy,
    ppl,
)
from chimera.evaluation.target import load_target
from chimera.evaluation.width import count_parameters, solve_width
from chimera.trainer.checkpoint import write_weights_checkpoint
from tests.helpers import REPO, build_model


def _run_dir(tmp_path, preset="griffin-tiny", weights=None, name="run"):
    """A run directory whose only checkpoint holds ``weights`` (default: the preset's initialisation)."""
    cfg = load_model_config(preset)
    model = build_model(preset, seed=3)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    if weights is not None:
        state = {n: weights(t) for n, t in state.items()}
    return write_weights_checkpoint(tmp_path / name, cfg, state, "test")


# ---- MQAR: Zoology's per-query exact match ---------------------------------------------------------


def test_mqar_accuracy_equals_a_hand_computed_case():
    """One instance, 4 queries; logits put the argmax on the right value for 3 of them: accuracy 3/4, and the
    summed loss is the hand-computed cross entropy of the 4 queried positions."""
    task = MQAR(vocab_size=20, seq_len=16, num_kv_pairs=4, random_non_queries=False)
    keys, values, slots = [1, 2, 3, 4], [10, 11, 12, 13], [0, 1, 2, 3]
    inputs, labels = task.build(keys, values, slots)
    queried = np.flatnonzero(labels != IGNORE_INDEX)
    assert queried.tolist() == [8, 10, 12, 14] and labels[queried].tolist() == values
    logits = torch.zeros(1, 16, 20)
    logits[0, 8, 10] = 2.0  # right
    logits[0, 10, 11] = 1.0  # right
    logits[0, 12, 12] = 3.0  # right
    logits[0, 14, 14] = 1.0  # wrong: 14, not 13
    logits[0, 3, 0] = 50.0  # unscored position: no effect
    tally = score(logits, torch.from_numpy(labels)[None])
    assert (tally.positions, tally.correct, tally.accuracy) == (4, 3, 0.75)

    def ce(row, target):  # -log softmax by hand: 19 zero logits and one set one
        z = math.log(sum(math.exp(v) for v in row.values()) + (20 - len(row)))
        return z - row.get(target, 0.0)

    expected = ce({10: 2.0}, 10) + ce({11: 1.0}, 11) + ce({12: 3.0}, 12) + ce({14: 1.0}, 13)
    assert tally.loss_nats == pytest.approx(expected, abs=1e-9)
    assert per_row_accuracy(logits, torch.from_numpy(labels)[None]) == [0.75]


def test_mqar_accuracy_of_a_model_equals_a_per_query_loop(single_process):
    """The suite's batched accuracy equals a loop over instances and their queries, argmax by argmax."""
    from chimera.data.synthetic import sample_at
    from chimera.evaluation.suites import EVAL_SEED

    model = build_model("griffin-tiny", seed=1).eval()
    task = MQAR(vocab_size=256, seq_len=32, num_kv_pairs=4)
    tally = mqar_accuracy(model, task, 6)
    stream = EVAL_SEED * 1_000_003 + 32 * 1009 + 4
    right = total = 0
    for i in range(6):
        inputs, labels = sample_at(task, stream, i)
        with torch.no_grad():
            logits = model(torch.from_numpy(inputs)[None])[0]
        for pos in range(32):
            if labels[pos] != IGNORE_INDEX:
                total += 1
                right += int(int(logits[pos].argmax()) == labels[pos])
    assert total == tally.positions == 24
    assert right == tally.correct


# ---- Chomsky: the test split -------------------------------------------------------------------------


def test_chomsky_test_lengths_are_disjoint_from_the_training_lengths(tmp_path, single_process):
    target = load_target(_run_dir(tmp_path))
    opts = ChomskyOptions(tasks=["parity_check", "reverse_string"], num_lengths=3, samples=2,
                          train_lengths_checked=2)
    result = chomsky(target, opts)
    grid = length_grid((41, 500), 3)
    assert grid == [41, 270, 500]
    for row in result["rows"]:
        assert row["train_lengths"] == [1, 40] and row["test_lengths"] == [41, 500]
        lengths = [s["length"] for s in result["per_length"][row["task"]]]
        assert lengths == grid and min(lengths) > 40  # disjoint from 1..40
        assert 0.0 <= row["accuracy"] <= 1.0
    # the instances drawn at those lengths have exactly those input lengths
    task = make_task("reverse_string", split="test")
    for n in grid:
        problem, output = task.decode(task.sample(np.random.default_rng(n), n)[0])
        assert len(problem) == n and output == problem[::-1]
    with pytest.raises(UserError, match="overlap the lengths"):
        chomsky(target, ChomskyOptions(tasks=["parity_check"], test_lengths=(30, 60)))
    with pytest.raises(UserError, match="unknown task"):
        chomsky(target, ChomskyOptions(tasks=["palindrome"]))


def test_a_task_the_vocab_cannot_hold_is_refused(tmp_path, single_process):
    from chimera.evaluation.suites import MqarOptions, mqar

    target = load_target(_run_dir(tmp_path))  # vocab 320
    with pytest.raises(UserError, match="vocabulary holds 320"):
        mqar(target, MqarOptions(vocab_size=512, seq_lens=[64], kv_pairs=[4], samples=1))


# ---- ppl against the loss computed directly --------------------------------------------------------


def test_ppl_of_a_model_with_known_weights_equals_the_direct_loss(tmp_path, single_process):
    """All-zero weights give zero logits: every token costs exactly ln(vocab). A model's own weights: the suite's
    loss equals the model's training loss (its forward with labels) over the same windows."""
    opts = PplOptions(seq_len=64, max_tokens=64 * 10)
    zero = load_target(_run_dir(tmp_path, weights=torch.zeros_like, name="zero"))
    result = ppl(zero, opts)
    (row,) = result["rows"]
    assert row["tokens"] == 640
    assert row["loss"] == pytest.approx(math.log(320), abs=1e-6)
    assert row["perplexity"] == pytest.approx(320, rel=1e-6)
    assert row["bits_per_byte"] >= math.log2(320) - 1e-6  # separators are tokens, not bytes

    target = load_target(_run_dir(tmp_path, name="init"))
    result = ppl(target, opts)
    (_, stream), = _text_streams(target, opts)
    losses = []
    for i in range(10):
        w = torch.from_numpy(stream.window(i * 64, 65).tokens.astype(np.int64))[None]
        with torch.no_grad():
            losses.append(target.model(w[:, :-1], w[:, 1:]).item())  # the mean over the window's 64 tokens
    assert result["summary"]["loss"] == pytest.approx(sum(losses) / 10, abs=1e-6)
    assert result["summary"]["tokens"] == 640


# ---- width solving ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["griffin-tiny", "hawk-tiny", "local-transformer-tiny"])
@pytest.mark.parametrize("target", [150_000, 600_000, 2_500_000])
def test_solved_widths_match_the_target_count_within_2_percent(preset, target):
    width = solve_width(preset, target)
    recount = count_parameters(preset, width.overrides)  # meta-device count of the solved config
    assert recount == width.parameters
    assert abs(recount - target) / target <= 0.02
    cfg = load_model_config(preset, [f"{k}={v}" for k, v in width.overrides.items()])
    assert cfg.d_model == width.d_model and cfg.d_model % (2 * cfg.num_heads) == 0


def test_matching_griffin_at_d_model_144():
    """The shipped experiment's match: Hawk and local attention at Griffin's count (d_model 144, 6 blocks)."""
    base = {"num_layers": 12, "vocab_size": 2112, "window": 64}
    griffin = count_parameters("griffin-tiny", {**base, "d_model": 144, "mlp_hidden": 288})
    for preset in ("hawk-tiny", "local-transformer-tiny"):
        width = solve_width(preset, griffin, base)
        assert abs(width.parameters - griffin) / griffin <= 0.02


def test_an_unreachable_target_is_refused():
    with pytest.raises(UserError, match="nearest count"):
        solve_width("griffin-tiny", 1_000, tolerance=0.02)


def test_zoology_mqar_has_every_mixer_of_the_zoo_and_each_learns_from_an_mqar_batch():
    """Every mixer symbol of the registry is in some model of configs/experiments/zoology-mqar.yaml (a new mixer
    without a row fails here); each model at the smallest width takes one SGD step on an MQAR batch and its loss on
    that batch falls from about ln(vocab)."""
    from chimera.evaluation.bench import plan
    from chimera.evaluation.experiment import run_config, task_of
    from chimera.models import causal_lm
    from chimera.models.registry import sublayers
    from chimera.parallel.dims import ParallelDims

    p = plan(REPO / "configs/experiments/zoology-mqar.yaml", None)
    mixers = {s for s, spec in sublayers().items() if spec.build.__module__.startswith("chimera.models.mixers.")}
    smallest = {}
    for spec in p.specs:
        if spec.variant.entry not in smallest or spec.variant.d_model < smallest[spec.variant.entry].variant.d_model:
            smallest[spec.variant.entry] = spec
    patterns = {name: run_config(spec, p.experiment).model.pattern for name, spec in smallest.items()}
    assert mixers <= set("".join(patterns.values())), mixers - set("".join(patterns.values()))
    task = task_of(p.experiment.tasks[0], seq_len=64)
    rng = np.random.default_rng(0)
    batch = [task.sample(rng) for _ in range(4)]
    ids = torch.stack([torch.as_tensor(inputs, dtype=torch.long) for inputs, _ in batch])
    labels = torch.stack([torch.as_tensor(target, dtype=torch.long) for _, target in batch])
    for name, spec in smallest.items():
        model = causal_lm.build_model(run_config(spec, p.experiment).model, ParallelDims(), seed=0)
        loss = model(ids, labels=labels)
        assert abs(loss.item() - math.log(p.experiment.vocab_size)) < 1.0, (name, loss.item())
        loss.backward()
        with torch.no_grad():
            for w in model.parameters():
                if w.grad is not None:
                    w -= 0.5 * w.grad
        assert model(ids, labels=labels).item() < loss.item(), name
