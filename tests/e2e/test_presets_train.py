"""Every test-size preset trains on the built-in corpus through `chimera train` with TP=2 (loss falls), and
`chimera generate` samples from the trained run through the mixers' decoding states: its greedy text equals the
argmax of full forward passes over the growing sequence.

The presets are split over two files (this one: those of model zoo I, ``test_zoo2_presets_train.py``: the rest), so
that the two pytest workers share them (``helpers.trains_with_tensor_parallelism_and_generates``)."""

import pytest

from helpers import ZOO_ONE, test_size_presets, trains_with_tensor_parallelism_and_generates


@pytest.mark.parametrize("preset", [p for p in test_size_presets() if p in ZOO_ONE])
def test_tiny_preset_trains_with_tensor_parallelism_and_generates(tmp_path, preset, run_here):
    trains_with_tensor_parallelism_and_generates(tmp_path, preset, run_here)
