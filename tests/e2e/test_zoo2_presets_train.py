"""The test-size presets of model zoo II (Hyena, StripedHyena, Based, GoldFinch, Gryphon, and any added since) train
with TP=2 and generate through `chimera generate` (see ``test_presets_train.py``)."""

import pytest

from helpers import ZOO_ONE, presets_for_tests, trained_with_tensor_parallelism_and_generates

PRESETS = [p for p in presets_for_tests() if p not in ZOO_ONE]


@pytest.mark.parametrize("preset", PRESETS)
def test_tiny_preset_trains_with_tensor_parallelism_and_generates(tp2_runs, preset, run_here):
    trained_with_tensor_parallelism_and_generates(tp2_runs / preset, preset, run_here)
