"""The byte-latent model (Hyena-GLT) at TP=2 equals TP=1: logits, loss (byte loss + entropy-model loss) and every
full gradient, with patches of several bytes (stride patching: the same boundaries at both layouts, where entropy
patches of an untrained entropy model are single bytes)."""

import pytest

from helpers import assert_same_numbers, run_tp_layout


@pytest.mark.parametrize("preset", ["hyena-glt-tiny+byte_latent.patching=stride+byte_latent.stride=3",
                                    "hyena-glt-tiny"])
def test_tp2_equals_tp1(tmp_path, preset):
    assert_same_numbers(run_tp_layout(tmp_path, preset, 2, False), run_tp_layout(tmp_path, preset, 1, False))
