"""`chimera bench`'s pieces: the scaling exponent fit, the layouts and lengths it reads."""

from __future__ import annotations

import math
import random

import pytest

from chimera.errors import UserError
from chimera.launch.bench import Point, fit_exponent, parse_layout, parse_lengths, processes, sequence_exponent


@pytest.mark.parametrize("alpha", [1.0, 1.37, 2.0])
def test_fit_recovers_a_known_exponent(alpha):
    lengths = [1024, 2048, 4096, 8192, 16384]
    rng = random.Random(0)
    noisy = [3e-5 * n ** alpha * math.exp(rng.gauss(0, 0.01)) for n in lengths]
    assert fit_exponent(lengths, noisy) == pytest.approx(alpha, abs=0.02)
    assert fit_exponent(lengths, [3e-5 * n ** alpha for n in lengths]) == pytest.approx(alpha, abs=1e-12)


def test_sequence_exponent_is_per_sequence():
    """Same tokens per step: a linear model's step time is flat in L, its time per sequence linear."""
    points = [Point("1", n, 16384 // n, 0.5, 1.0, None, 1, 1e12, "x") for n in (1024, 2048, 4096)]
    assert sequence_exponent(points) == pytest.approx(1.0)
    assert points[0].tokens_per_s == pytest.approx(16384 / 0.5)


def test_layouts():
    assert parse_layout("1") == {}
    assert parse_layout("tp2xdp2") == {"tensor": 2, "data": 2}
    assert processes(parse_layout("tp2xpp2xdp2")) == 8
    for bad in ("tp0", "xx2", "tp2xtp2", "tp2,dp2", ""):
        with pytest.raises(UserError, match="--layouts"):
            parse_layout(bad)


def test_lengths():
    assert parse_lengths("2048,1024") == [1024, 2048]
    for bad in ("", "1024,abc", "1", "64,64"):
        with pytest.raises(UserError, match="--seq-lens"):
            parse_lengths(bad)
