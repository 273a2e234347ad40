"""TP=2 (with and without sequence parallelism) equals TP=1 for the same weights: logits, loss, gradients."""

import pytest

from helpers import assert_same_numbers, run_worker

PRESETS = ["griffin-tiny", "transformer-tiny", "llama-tiny", "mamba-tiny", "mamba2-tiny", "hybrid-moe-tiny",
           "based-tiny", "gryphon-tiny", "hyena-tiny", "striped-hyena-tiny", "striped-hyena2-tiny",
           "goldfinch-tiny"]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    return {tp: run_worker(tmp / f"tp{tp}.pt", "tp_worker.py", tp, tp, tmp / f"tp{tp}.pt", *PRESETS) for tp in (1, 2)}


@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("preset", PRESETS)
def test_tp2_equals_tp1(layouts, preset, sequence_parallel):
    assert_same_numbers(layouts[2][preset, sequence_parallel], layouts[1][preset, False])


def test_routed_hybrid_tp2_equals_tp1(tmp_path):
    """The routed hybrid ('Y', no sequence parallelism): routing identical on both ranks, each path split."""
    preset = "dynamic-hybrid-tiny"
    got = {tp: run_worker(tmp_path / f"tp{tp}.pt", "tp_worker.py", tp, tp, tmp_path / f"tp{tp}.pt", preset)
           for tp in (1, 2)}
    assert_same_numbers(got[2][preset, False], got[1][preset, False])
