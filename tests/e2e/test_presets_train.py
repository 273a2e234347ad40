"""Every test-size preset trains on the built-in corpus with TP=2 (loss falls), and `chimera generate` samples from
the trained run through the mixers' decoding states: its greedy text equals the argmax of full forward passes over
the growing sequence.

The presets are split over two files (this one: those of model zoo I, ``test_zoo2_presets_train.py``: the rest), so
that the two pytest workers share them; each file trains its presets in one process group (the ``tp2_runs`` fixture)."""

import pytest

from helpers import ZOO_ONE, presets_for_tests, trained_with_tensor_parallelism_and_generates

PRESETS = [p for p in presets_for_tests() if p in ZOO_ONE]


@pytest.mark.parametrize("preset", PRESETS)
def test_tiny_preset_trains_with_tensor_parallelism_and_generates(tp2_runs, preset, run_here):
    trained_with_tensor_parallelism_and_generates(tp2_runs / preset, preset, run_here)
