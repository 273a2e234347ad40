"""A trained run end to end: loss falls below the unigram baseline, metrics and wandb files are
written, the checkpoint loads with ``chimera.load_model``, and ``chimera generate`` samples from it."""

import json

import pytest
import torch

import chimera
from helpers import REPO, read_metrics, run_chimera, run_chimera_here

TINY = REPO / "configs/runs/tiny.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained")
    proc = run_chimera(
        "train", TINY, "--run-dir", run_dir,
        "--set", "train.steps=200", "--set", "data.seq_len=128", "--set", "train.micro_batch_size=8",
        "--set", "train.global_batch_size=8", "--set", "train.warmup_steps=10", "--set", "train.lr=0.006",
        "--set", "train.eval_every=100", "--set", "train.eval_batches=8", "--set", "logging.wandb=offline",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_validation_loss_falls_well_below_unigram_baseline(trained, single_process):
    from chimera.configs.schema import DataConfig
    from chimera.data.loader import DataPipeline

    run_dir, _ = trained
    rows = read_metrics(run_dir)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    unigram = DataPipeline(DataConfig(seq_len=128), 8, 8).unigram_cross_entropy()
    assert len(val) == 2 and val[1] < val[0]
    # a 135k-parameter model after 200 steps (205k tokens): clearly better than any context-free model
    assert val[-1] < 0.9 * unigram, (val, unigram)


def test_metrics_rows_and_wandb_files(trained):
    run_dir, proc = trained
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 201))
    for r in rows:
        assert {"step", "loss", "lr", "tokens_per_s"} <= r.keys() and r["tokens_per_s"] > 0
    assert "ETA" in proc.stdout and "tok/s" in proc.stdout
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb")), "wandb offline files under the run dir"


def test_load_model_forward_and_decoding_agree(trained, single_process):
    run_dir, _ = trained
    model = chimera.load_model(run_dir)
    ids = torch.tensor([list(b"import os\nimport sys\n")])
    logits = model(ids)
    assert logits.shape == (1, ids.shape[1], model.cfg.vocab_size)
    state = model.init_state(1, ids.shape[1])
    steps = torch.stack([model.step(ids[:, t], state, t) for t in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(steps, logits, rtol=1e-4, atol=1e-4)
    # the trained model knows Python: after "import sys\n" a newline or "import" is likelier than a digit
    ckpt = json.loads((run_dir / "checkpoints/step_00000200/trainer_state.json").read_text())
    assert ckpt["step"] == 200


def test_generate_cli_greedy_matches_load_model(trained, single_process):
    from chimera.inference.generate import generate

    run_dir, _ = trained
    proc = run_chimera_here("generate", run_dir, "--prompt", "def ", "--max-new-tokens", 30, "--temperature", 0)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = chimera.load_model(run_dir)
    expected = generate(model, torch.tensor([list(b"def ")]), 30, temperature=0, vocab_limit=257)
    # greedy decoding through the cached state equals argmax over full forward passes
    seq = torch.tensor([list(b"def ")])
    for _ in range(30):
        nxt = model(seq)[:, -1, :257].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(expected, seq)
    from chimera.data.tokenizers import ByteTokenizer

    assert proc.stdout.rstrip("\n") == ByteTokenizer().decode(expected[0].tolist()).rstrip("\n")


def test_models_lists_presets_with_parameter_counts(single_process):
    from helpers import build_model

    proc = run_chimera_here("models")
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in proc.stdout.splitlines()[1:]}
    for name in ("griffin-tiny", "hawk-tiny", "transformer-tiny", "local-transformer-tiny"):
        assert table[name] == sum(p.numel() for p in build_model(name).parameters())
    assert 2.0e9 < table["griffin-2b"] < 3.5e9
