"""AdamW groups (what decays) and the warmup + cosine schedule."""

import math

from chimera.configs.schema import TrainConfig
from chimera.trainer.optim import lr_at, param_groups
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


def test_warmup_then_cosine():
    cfg = TrainConfig(steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert all(math.isclose(lr_at(s, cfg), (s + 1) / 10) for s in range(10))
    assert lr_at(9, cfg) == 1.0 and lr_at(10, cfg) == 1.0
    assert math.isclose(lr_at(60, cfg), 0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(lr_at(110, cfg), 0.1) and math.isclose(lr_at(500, cfg), 0.1)
    values = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
