"""Zamba2's shared blocks under pipeline parallelism: block 0 is used on both stages (pattern ``MM0M|M1MM0M``).

Each stage holds a copy; their gradients are summed over the stages before the optimizer step, so every copy's
gradient is the gradient of the one logical parameter: the sum over all its uses, which is what one process computes
(autograd sums a tensor's uses). The checkpoint holds each shared parameter once.
"""

import json

import torch

from helpers import run_worker


def test_shared_block_gradient_is_the_sum_over_stages_and_saved_once(tmp_path):
    ref = run_worker(tmp_path / "one.pt", "shared_block_worker.py", 1, tmp_path / "one.pt", tmp_path / "run1")
    got = run_worker(tmp_path / "two.pt", "shared_block_worker.py", 2, tmp_path / "two.pt", tmp_path / "run2")
    assert abs(got["loss"] - ref["loss"]) <= 1e-6 * abs(ref["loss"])
    whole = ref["grads"][0]
    first, second = got["grads"]
    block0 = {n for n in whole if n.startswith("shared.0.")}
    assert block0 and block0 <= set(first) and block0 <= set(second)  # a copy on each stage
    assert not any(n.startswith("shared.1.") for n in first)  # block 1 is used on the second stage only
    for stage in (first, second):
        for name, grad in stage.items():
            torch.testing.assert_close(grad, whole[name], rtol=1e-6, atol=1e-6 * whole[name].abs().max().item(),
                                       msg=name)
        assert all(g.abs().max() > 0 for g in stage.values())

    # saved once: over every rank's index, each shared weight's stored elements number exactly its size
    tensors = next((tmp_path / "run2/checkpoints").glob("step_*")) / "tensors"
    shapes = json.loads((tensors / "shapes.json").read_text())
    stored = {}
    for index in tensors.glob("rank_*.index.json"):
        for name, boxes in json.loads(index.read_text())["tensors"].items():
            for box in boxes:
                stored[name] = stored.get(name, 0) + int(torch.tensor([b - a for a, b in box["box"]]).prod())
    for name in (n for n in shapes if n.startswith(("model/shared.", "exp_avg/shared."))):
        assert stored[name] == int(torch.tensor(shapes[name]).prod()), name
