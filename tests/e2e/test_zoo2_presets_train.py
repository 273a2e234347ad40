"""The test-size presets of model zoo II (Hyena, StripedHyena, Based, GoldFinch, Gryphon, and any added since) train
through `chimera train` with TP=2 and generate through `chimera generate` (see ``test_presets_train.py``)."""

import pytest

from helpers import ZOO_ONE, test_size_presets, trains_with_tensor_parallelism_and_generates


@pytest.mark.parametrize("preset", [p for p in test_size_presets() if p not in ZOO_ONE])
def test_tiny_preset_trains_with_tensor_parallelism_and_generates(tmp_path, preset, run_here):
    trains_with_tensor_parallelism_and_generates(tmp_path, preset, run_here)
