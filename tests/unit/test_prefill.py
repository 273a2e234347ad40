"""One-pass prefill: ``prefill`` of a prompt then ``step`` equals stepping from the start, for every test-size preset
(each family's tiny model: recurrences, attention with a wrapping ring buffer, convolutions, MoE, shared blocks, the
routed hybrid and the byte-latent model), in logits at every position and in the decoding state itself."""

import copy

import pytest
import torch

from helpers import build_model, presets_for_tests

PROMPT, DECODE, BATCH = 20, 10, 2  # the prompt is longer than the tiny presets' window of 16: the ring buffer wraps
TOLERANCE = 1e-5  # fp32


def leaves(state, path="state"):
    """``(path, tensor)`` of every tensor in a nested decoding state; other values (ints, None) as themselves."""
    if isinstance(state, dict):
        return [x for k, v in state.items() for x in leaves(v, f"{path}.{k}")]
    if isinstance(state, (list, tuple)):
        return [x for i, v in enumerate(state) for x in leaves(v, f"{path}[{i}]")]
    return [(path, state)]


def assert_same_state(got, expected):
    got, expected = leaves(got), leaves(expected)
    assert [p for p, _ in got] == [p for p, _ in expected]
    for (path, a), (_, b) in zip(got, expected):
        if isinstance(b, torch.Tensor):
            assert a.shape == b.shape and a.dtype == b.dtype, path
            if a.is_floating_point() or a.is_complex():
                assert (a - b).abs().max() <= TOLERANCE, (path, float((a - b).abs().max()))
            else:  # positions, token ids, masks, counts
                assert torch.equal(a, b), path
        else:
            assert a == b, path


@pytest.mark.parametrize("preset", presets_for_tests())
def test_prefill_then_step_equals_stepping(single_process, preset):
    model = build_model(preset).eval()
    total = PROMPT + DECODE
    ids = torch.randint(0, 256, (BATCH, total), generator=torch.Generator().manual_seed(3))

    state = model.init_state(BATCH, total)
    stepped = []
    for t in range(total):
        stepped.append(model.step(ids[:, t], state, t))
        if t == PROMPT - 1:
            after_prompt = copy.deepcopy(state)
    stepped = torch.stack(stepped, 1)  # [b, total, V]

    logits, prefilled = model.prefill(ids[:, :PROMPT], total)
    assert logits.shape == (BATCH, PROMPT, stepped.shape[-1])
    assert_same_state(prefilled, after_prompt)
    decoded = torch.stack([model.step(ids[:, t], prefilled, t) for t in range(PROMPT, total)], 1)
    diff = (torch.cat([logits, decoded], 1) - stepped).abs().max()
    assert diff <= TOLERANCE, (preset, float(diff))


def test_prefill_equals_forward_logits(single_process):
    """The prefill's logits are the training forward's (one parallel pass), not a re-derivation."""
    model = build_model("griffin-tiny").eval()
    ids = torch.randint(0, 256, (BATCH, PROMPT), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model.prefill(ids, PROMPT)[0], model(ids))
