"""Rows at their own positions: prompts of different lengths, each prefilled alone and their states stacked along the
batch, then stepped together with ``pos = LongTensor [b]``, give every row the logits it gets decoded alone (for every
test-size preset: attention's ring buffers and RoPE at per-row positions, recurrences, and the mixers stepped per
group of rows at one position). (A capacity-limited MoE would couple the rows of a step by its definition: no
test-size preset has one.) The one-position path (``pos: int``) is ``test_prefill.py``'s."""

import pytest
import torch

from chimera.models.batch_state import put_rows, stack_states, state_layout, take_rows
from helpers import build_model, presets_for_tests

LENGTHS = (20, 7, 13)  # 20 > the tiny presets' window of 16: that row's ring buffer has wrapped
DECODE = 6
MAX_LEN = max(LENGTHS) + DECODE
TOLERANCE = 1e-5  # fp32


@pytest.mark.parametrize("preset", presets_for_tests())
def test_rows_at_own_positions_decode_as_alone(single_process, preset):
    model = build_model(preset).eval()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (1, n), generator=g) for n in LENGTHS]
    follow = torch.randint(0, 256, (len(LENGTHS), DECODE), generator=g)  # the tokens fed after each prompt

    alone = []
    for i, prompt in enumerate(prompts):
        _, state = model.prefill(prompt, MAX_LEN)
        alone.append(torch.stack([model.step(follow[i, t: t + 1], state, prompt.shape[1] + t)[0]
                                  for t in range(DECODE)]))
    alone = torch.stack(alone)  # [rows, DECODE, V]

    state = stack_states([model.prefill(p, MAX_LEN)[1] for p in prompts], state_layout(model))
    lengths = torch.tensor(LENGTHS)
    together = torch.stack([model.step(follow[:, t], state, lengths + t) for t in range(DECODE)], 1)
    diff = float((together - alone).abs().max())
    assert diff <= TOLERANCE, (preset, diff)


def test_take_and_put_rows_round_trip(single_process):
    model = build_model("griffin-tiny").eval()
    layout = state_layout(model)
    _, state = model.prefill(torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(6)), 12)
    rows = torch.tensor([2, 0])
    part = take_rows(state, layout, rows)
    assert part[0]["h"].shape[0] == 2
    torch.testing.assert_close(part[0]["h"][0], state[0]["h"][2], rtol=0, atol=0)
    part[0]["h"] = part[0]["h"] + 1
    put_rows(state, layout, rows, part)
    torch.testing.assert_close(state[0]["h"][[2, 0]], part[0]["h"], rtol=0, atol=0)
