"""TP=2 (with and without sequence parallelism) equals TP=1 for the same weights: logits, loss, gradients."""

import pytest

from helpers import assert_same_numbers, run_tp_layout


@pytest.mark.parametrize(
    "preset", ["griffin-tiny", "transformer-tiny", "llama-tiny", "mamba-tiny", "mamba2-tiny", "hybrid-moe-tiny"]
)
def test_tp2_equals_tp1(tmp_path, preset):
    ref = run_tp_layout(tmp_path, preset, 1, False)
    for sp in (False, True):
        assert_same_numbers(run_tp_layout(tmp_path, preset, 2, sp), ref)
