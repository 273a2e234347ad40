"""Label smoothing under vocabulary parallelism (TP=2) equals torch's ``F.cross_entropy(label_smoothing=...)``:
per-token losses, the logits' gradient, and a model's training loss (its validation loss unsmoothed)."""

import torch
import torch.nn.functional as F

from helpers import run_worker


def test_vocab_parallel_label_smoothing_equals_torch(tmp_path):
    got = run_worker(tmp_path / "ls.pt", "label_smoothing_worker.py", 2, tmp_path / "ls.pt", 0.1, "gryphon-tiny")
    logits = got["logits"].clone().requires_grad_(True)
    expected = F.cross_entropy(logits.flatten(0, 1), got["targets"].flatten(), reduction="none", label_smoothing=0.1)
    expected.mean().backward()
    torch.testing.assert_close(got["losses"], expected.view(6, 3), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["grad"], logits.grad, rtol=1e-6, atol=1e-6)
    logits, labels = got["model_logits"].flatten(0, 1), got["labels"].flatten()
    torch.testing.assert_close(got["train_loss"], F.cross_entropy(logits, labels, label_smoothing=0.1),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["eval_loss"], F.cross_entropy(logits, labels), rtol=1e-5, atol=1e-6)
    assert (got["train_loss"] - got["eval_loss"]).abs() > 1e-3
