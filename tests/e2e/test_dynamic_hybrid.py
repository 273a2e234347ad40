"""Granite-4.0-H -> the routed hybrid ('Y'): ``chimera import-hf --into dynamic-hybrid`` of a tiny random
transformers GraniteMoeHybrid gives its logits (1e-4), then trains with routing on; bad routed-hybrid input is one
line, exit 2."""

import json

import pytest
import torch
from e2e.test_cli_errors import assert_user_error
from e2e.test_hf_granite import IDS, tiny_granite

import chimera
from helpers import REPO, run_chimera, run_chimera_here


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("granite")
    hf_model = tiny_granite()
    hf_model.save_pretrained(tmp / "hf")
    proc = run_chimera_here("import-hf", tmp / "hf", "--out", tmp / "run", "--into", "dynamic-hybrid")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return hf_model, tmp


def test_converted_granite_equals_transformers(converted, single_process):
    hf_model, tmp = converted
    ours = chimera.load_model(tmp / "run")
    assert ours.cfg.layers == "YEYEYEYEYEYE" and ours.cfg.routed_forced
    with torch.no_grad():
        ref = hf_model(IDS).logits
        assert ref.abs().max() > 0.5
        assert (ours(IDS) - ref).abs().max() <= 1e-4
    got = ours.training_metrics()
    assert got["routed/layers.2/fraction_attention"] == 1.0 and got["routed/layers.0/fraction_ssm"] == 1.0
    assert got["routed/layers.0/bridge_attention_to_ssm"] == 0.0


def test_converted_granite_trains_with_routing_on(converted, single_process):
    """The converted weights, routing switched on (attention capped at a quarter of the tokens): a few optimiser
    steps on a fixed batch lower the loss, with the router and bridges trained."""
    from chimera.models.mixers.routed_hybrid import RoutedHybrid

    _, tmp = converted
    model = chimera.load_model(tmp / "run").train()
    blocks = [m for m in model.modules() if isinstance(m, RoutedHybrid)]
    for b in blocks:
        b.forced, b.capacity = False, (1.0, 0.25)
    opt = torch.optim.Adam([p for p in model.parameters() if p.is_floating_point()], lr=3e-3)
    losses = []
    for _ in range(4):
        loss = model(IDS, labels=IDS)
        opt.zero_grad()
        loss.backward()
        assert blocks[1].router.weight.grad.abs().sum() > 0 and blocks[1].bridge_ssm_to_attention.grad is not None
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    got = model.training_metrics()
    assert 0 < got["routed/layers.2/fraction_attention"] <= 0.25 and got["routed/layers.2/capacity_overflow"] > 0


def test_chimera_train_continues_the_converted_run_with_routing_on(converted, tmp_path):
    """`chimera train` on the converted run directory with routing switched on (a model change that keeps every
    parameter's shape, allowed from weights-only checkpoints and said): the loss falls and attention holds at most
    its capacity; a change of shapes is refused in one line."""
    import shutil

    _, tmp = converted
    run = tmp_path / "run"
    shutil.copytree(tmp / "run", run)
    common = ["--run-dir", run, "--set", "train.steps=8", "--set", "train.warmup_steps=1", "--set", "train.lr=0.003",
              "--set", "train.micro_batch_size=4", "--set", "train.global_batch_size=4", "--set", "data.seq_len=64",
              "--set", "logging.progress=false", "--set", "train.eval_every=0"]
    refused = run_chimera("train", run / "run.yaml", *common, "--set", "model.num_heads=2")
    assert_user_error(refused, "model.num_heads")
    proc = run_chimera("train", run / "run.yaml", *common, "--set", "model.routed_forced=false",
                       "--set", "model.routed_capacity_attention=0.25")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with model changes: model.routed_capacity_attention, model.routed_forced" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(0 < r["routed/layers.2/fraction_attention"] <= 0.25 for r in rows)


TINY = REPO / "configs/runs/tiny.yaml"


@pytest.mark.parametrize("args, expected", [
    (["--set", "model.preset=dynamic-hybrid-tiny", "--set", "model.routed_overflow=drop"],
     "routed_overflow must be 'other' or 'residual'"),
    (["--set", "model.preset=dynamic-hybrid-tiny", "--set", "model.routed_capacity_attention=0"],
     "model.routed_capacity_attention"),
    (["--set", "model.preset=dynamic-hybrid-tiny", "--set", "model.routed_capacity_ssm=2"],
     "model.routed_capacity_ssm"),
    (["--set", "model.preset=dynamic-hybrid-tiny", "--set", "model.routed_aux_loss_coef=-1"],
     "model.routed_aux_loss_coef"),
    (["--set", "model.preset=dynamic-hybrid-tiny", "--set", "model.routed_state_ratios=[3]"],
     "routed_state_ratios=[3]"),
    (["--set", "model.preset=dynamic-hybrid-tiny", "--set", "model.routed_state_keep=0"], "model.routed_state_keep"),
    (["--set", "model.preset=dynamic-hybrid-tiny", "--set", "model.routed_forced=maybe"], "model.routed_forced"),
    (["--set", "model.preset=dynamic-hybrid-tiny", "--set", "parallel.context=2", "--nproc", "2"],
     "needs each whole sequence on one rank"),
])
def test_bad_routed_hybrid_input(tmp_path, run_here, args, expected):
    proc = run_here("train", TINY, "--run-dir", tmp_path / "run", *args)
    assert_user_error(proc, expected)
    assert not (tmp_path / "run").exists()


def test_bad_into(tmp_path):
    proc = run_chimera_here("import-hf", tmp_path, "--out", tmp_path / "o", "--into", "griffin")
    assert_user_error(proc, "argument --into: invalid choice: 'griffin'")
