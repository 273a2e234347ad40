"""Gryphon's training specifics: S5's parameters at 0.1x the learning rate (declared at the parameter), label
smoothing as torch defines it (training loss only), and the presets' sizes."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from chimera.configs.loader import load_model_config
from chimera.configs.schema import TrainConfig
from chimera.models.causal_lm import meta_model
from chimera.trainer.optim import build_optimizer, build_schedule, param_groups
from helpers import build_model

S5_SCALED = ("lambda_re", "lambda_im", "log_step", "B")


def test_s5_parameters_get_their_own_group_at_a_tenth_of_the_rate(single_process):
    model = build_model("gryphon-tiny")
    groups = param_groups(model, 0.1, lr=2e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert [g["name"] for g in groups] == ["decay", "no_decay", "no_decay_lr_x0.1"]
    scaled = by_name["no_decay_lr_x0.1"]
    assert scaled == {n for n in names.values() if n.rsplit(".", 1)[-1] in S5_SCALED and ".ssm." in n}
    assert len(scaled) == 4 * 2  # two S layers
    assert groups[2]["lr"] == pytest.approx(2e-4) and groups[2]["weight_decay"] == 0.0
    assert "lr" not in groups[0] and "layers.0.mixer.ssm.C" in by_name["decay"]
    assert "layers.0.mixer.ssm.D" in by_name["no_decay"]


def test_one_adamw_step_moves_s5_parameters_a_tenth_as_far(single_process):
    """AdamW's first update is lr * g / (|g| + eps) per element: +-lr where |g| >> eps; under the schedule too."""
    model = build_model("gryphon-tiny", seed=2)
    cfg = TrainConfig(steps=10, lr=1e-2, min_lr=1e-3, warmup_steps=2, weight_decay=0.0)
    optimizer = build_optimizer(model, cfg)
    schedule = build_schedule(cfg)(optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-3, 5e-3, 5e-4])  # warmup step 0: lr / 2
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids, labels=torch.roll(ids, -1, 1)).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    schedule.step()
    for name, p in model.named_parameters():
        moved, g = (p.detach() - before[name]).abs(), p.grad.abs()
        big = g > 1e-5  # eps = 1e-8 is negligible there
        scale = 0.1 if name.rsplit(".", 1)[-1] in S5_SCALED and ".ssm." in name else 1.0
        rounding = 2 * torch.finfo(torch.float32).eps * before[name].abs()  # fp32 parameters (Lambda_im up to ~80)
        assert ((moved - 5e-3 * scale).abs() <= 1e-3 * 5e-3 * scale + rounding)[big].all(), name
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-2, 1e-2, 1e-3])  # the ratio holds


def test_label_smoothing_is_torchs_and_for_training_only(single_process):
    model = build_model("gryphon-tiny", seed=1)
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(ids, -1, 1)
    labels[0, :4] = -100
    logits = model(ids).flatten(0, 1)
    model.label_smoothing = 0.2
    model.train()
    torch.testing.assert_close(model(ids, labels=labels),
                               F.cross_entropy(logits, labels.flatten(), label_smoothing=0.2), rtol=1e-6, atol=1e-6)
    model.eval()  # validation: unsmoothed
    torch.testing.assert_close(model(ids, labels=labels), F.cross_entropy(logits, labels.flatten()),
                               rtol=1e-6, atol=1e-6)
    assert TrainConfig(steps=1, warmup_steps=0, label_smoothing=0.1).label_smoothing == 0.1
    with pytest.raises(ValidationError, match="label_smoothing"):
        TrainConfig(steps=1, warmup_steps=0, label_smoothing=1.0)


def s5_count(d: int, P: int) -> int:
    """Lambda (re, im) and log_step per stored state, B~ and C~ as real pairs, D: P / 2 stored states."""
    stored = P // 2
    return 3 * stored + 2 * (2 * stored * d) + d


@pytest.mark.parametrize("preset, d, P, heads, kv, hidden, layers", [("gryphon-tiny", 64, 64, 4, 2, 128, 8),
                                                                    ("gryphon-small", 192, 128, 6, 1, 512, 12)])
def test_preset_sizes_follow_from_the_architecture(preset, d, P, heads, kv, hidden, layers):
    head_dim = d // heads
    bigbird = d * heads * head_dim * 2 + 2 * d * kv * head_dim
    # "S-K-" repeated: layers / 4 of each mixer, layers / 2 gated MLPs, a norm per sublayer; tied embedding, final norm
    expected = (layers // 4 * (s5_count(d, P) + bigbird) + layers // 2 * 3 * d * hidden + layers * d
                + 320 * d + d)
    assert meta_model(load_model_config(preset)).num_parameters() == expected
    if preset == "gryphon-tiny":
        assert expected < 1_000_000
    else:
        assert 2.1e6 < expected < 2.5e6  # transformer-small's size


def test_chimera_models_lists_the_gryphon_presets(single_process, capsys):
    from chimera.launch.cli import main

    assert main(["models"]) == 0
    table = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:] if line.strip()}
    for preset in ("gryphon-tiny", "gryphon-small"):
        assert int(table[preset].replace(",", "")) == meta_model(load_model_config(preset)).num_parameters()


def test_the_whole_model_decodes_as_it_runs_forward(single_process):
    """Token-by-token decoding of gryphon-tiny (S5 states and BigBird's KV cache together) gives the forward logits;
    41 tokens: blocks of 4 with random ones from block 5 on, and a last block cut short."""
    model = build_model("gryphon-tiny", seed=4, overrides=["init_std=0.2"]).double().eval()
    ids = torch.randint(0, 320, (2, 41), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    state = model.init_state(2, 41)
    steps = torch.stack([model.step(ids[:, t], state, t) for t in range(41)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-9)
