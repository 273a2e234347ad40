"""AdamW groups (what decays) and the warmup + cosine schedule."""

import math

from chimera.configs.schema import TrainConfig
from chimera.trainer.optim import ScheduleAnchor, lr_at, param_groups
from helpers import build_model


def test_no_weight_decay_on_norms_biases_and_recurrence(single_process):
    model = build_model("griffin-tiny")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed | kept == set(names.values()) and not decayed & kept
    for n in kept:
        assert n.endswith(("norm.weight", "bias")) or ".rglru." in n, n
    for n in decayed:
        assert ".rglru." not in n and "norm" not in n and not n.endswith("bias"), n
    assert "layers.0.mixer.rglru.a_param" in kept and "layers.0.mixer.rglru.gate_a_weight" in kept
    assert "embed.weight" in decayed and "layers.1.mixer.up.weight" in decayed


def test_warmup_then_cosine_to_min_lr_at_the_last_step():
    cfg = TrainConfig(steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert all(math.isclose(lr_at(s, cfg), (s + 1) / 10) for s in range(10))
    assert lr_at(9, cfg) == 1.0  # the end of warmup is the cosine's start
    assert math.isclose(lr_at(59, cfg), 0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(lr_at(109, cfg), 0.1) and math.isclose(lr_at(500, cfg), 0.1)  # the last update: min_lr
    values = [lr_at(s, cfg) for s in range(9, 110)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_short_runs_end_at_min_lr():
    for steps, warmup in ((3, 2), (12, 2), (12, 0), (5, 5)):
        cfg = TrainConfig(steps=steps, lr=3e-3, min_lr=3e-4, warmup_steps=warmup)
        if warmup < steps:
            assert math.isclose(lr_at(steps - 1, cfg), 3e-4), (steps, warmup)
        assert math.isclose(lr_at(0, cfg), 3e-3 / max(warmup, 1)), (steps, warmup)


def test_an_anchor_continues_from_its_rate_to_min_lr():
    old = TrainConfig(steps=20, lr=1.0, min_lr=0.1, warmup_steps=2)
    new = TrainConfig(steps=40, lr=1.0, min_lr=0.1, warmup_steps=2)
    anchor = ScheduleAnchor(step=10, lr=lr_at(10, old))
    assert lr_at(10, new, anchor) == lr_at(10, old)  # no jump where the run resumed
    assert [lr_at(s, new, anchor) for s in range(10)] == [lr_at(s, new) for s in range(10)]
    assert math.isclose(lr_at(39, new, anchor), 0.1)
    values = [lr_at(s, new, anchor) for s in range(10, 40)]
    assert all(a > b for a, b in zip(values, values[1:]))
