"""Every test-size preset trains on the built-in corpus through `chimera train` with TP=2 (loss falls), and
`chimera generate` samples from the trained run through the mixers' decoding states: its greedy text equals the
argmax of full forward passes over the growing sequence."""

import pytest
import torch

import chimera
from helpers import REPO, read_metrics, run_chimera, test_size_presets

TINY = REPO / "configs/runs/tiny.yaml"
PROMPT, NEW_TOKENS = "def ", 12


def greedy_by_full_forward(model, prompt: bytes, n: int) -> list[int]:
    seq = torch.tensor([list(prompt)])
    for _ in range(n):
        nxt = model(seq)[:, -1, :257].argmax(-1)  # the byte tokenizer's 257 ids; the rest is vocabulary padding
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq[0].tolist()


@pytest.mark.parametrize("preset", test_size_presets())
def test_tiny_preset_trains_with_tensor_parallelism_and_generates(tmp_path, preset):
    proc = run_chimera("train", TINY, "--run-dir", tmp_path, "--nproc", 2, "--set", f"model.preset={preset}",
                       "--set", "parallel.tensor=2", "--set", "train.steps=30", "--set", "train.lr=0.005",
                       "--set", "train.warmup_steps=5", "--set", "train.micro_batch_size=8",
                       "--set", "train.global_batch_size=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path)
    losses = [r["loss"] for r in rows]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (preset, first, last)
    if "moe" in preset:  # per-layer router statistics reach the metrics
        loads = [v for k, v in rows[-1].items() if k.endswith("/expert_load")]
        assert loads and all(abs(sum(load) - 1) < 1e-3 for load in loads)
        assert all(k in rows[-1] for k in ("moe/layers.3/aux_loss", "moe/layers.3/z_loss"))

    sampled = run_chimera("generate", tmp_path, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS,
                          "--temperature", 0)
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    from chimera.data.tokenizers import ByteTokenizer

    expected = greedy_by_full_forward(chimera.load_model(tmp_path), PROMPT.encode(), NEW_TOKENS)
    assert sampled.stdout.rstrip("\n") == ByteTokenizer().decode(expected).rstrip("\n"), preset
