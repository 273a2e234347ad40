"""The linear scan equals the step-by-step linear recurrence, forward and backward, with every algorithm."""

import pytest
import torch

from chimera.models import scan
from chimera.models.scan import linear_recurrence_loop, linear_scan

ALGORITHMS = [scan.HillisSteele, scan.Sequential, scan.TwoLevel]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("length", [1, 2, 7, 64, 100])  # TwoLevel: chunks of 1, 1, 3 (one padded), 8 and 10 steps
def test_every_algorithm_equals_the_loop(algorithm, length):
    g = torch.Generator().manual_seed(length)
    a = torch.rand(length, 3, 5, generator=g, dtype=torch.float64)
    b = torch.randn(length, 3, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(algorithm.states(a, b), linear_recurrence_loop(a, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", [1, 2, 7, 64, 100])
@pytest.mark.parametrize("with_h0", [False, True])
def test_scan_equals_loop(length, with_h0):
    g = torch.Generator().manual_seed(length)
    a = torch.rand(length, 3, 5, generator=g, dtype=torch.float64)
    b = torch.randn(length, 3, 5, generator=g, dtype=torch.float64)
    h0 = torch.randn(3, 5, generator=g, dtype=torch.float64) if with_h0 else None
    torch.testing.assert_close(linear_scan(a, b, h0), linear_recurrence_loop(a, b, h0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("with_h0", [False, True])
def test_adjoint_gradients_equal_the_loop(monkeypatch, algorithm, with_h0):
    """The backward pass (the adjoint recurrence, reversed in time) equals autograd through the loop, for
    ``a`` broadcast over a dim of ``b`` (Mamba-2's per-head decay) and for an initial state."""
    monkeypatch.setattr(scan, "algorithm", lambda device, shape=None: algorithm)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(33, 4, 1, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(33, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True) if with_h0 else None
    w = torch.randn(33, 4, 3, generator=g, dtype=torch.float64)
    inputs = (a, b) + ((h0,) if with_h0 else ())
    got = torch.autograd.grad((linear_scan(a, b, h0) * w).sum(), inputs)
    expected = torch.autograd.grad((linear_recurrence_loop(a, b, h0) * w).sum(), inputs)
    for x, y in zip(got, expected, strict=True):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(9, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_scan, (a, b, h0))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_scan_is_stable_for_long_sequences(algorithm):
    # decays near 1 over 4096 steps: a cumulative-log formulation would overflow in fp32
    a = torch.full((4096, 2), 0.999)
    b = torch.ones(4096, 2)
    h = algorithm.states(a, b)
    expected = (1 - 0.999 ** torch.arange(1, 4097, dtype=torch.float64)) / (1 - 0.999)
    torch.testing.assert_close(h[:, 0].double(), expected, rtol=1e-4, atol=1e-3)


def test_cpu_chunks_long_scans_of_small_slices_only():
    """``TwoLevel`` where a step's slice is small and the sequence long (1 x 16k tokens of a 192-wide RG-LRU);
    ``Sequential`` for short sequences or wide slices; ``HillisSteele`` off the CPU."""
    cpu = torch.device("cpu")
    assert scan.algorithm(cpu, torch.Size([16384, 1, 192])) is scan.TwoLevel
    assert scan.algorithm(cpu, torch.Size([100, 1, 192])) is scan.Sequential
    assert scan.algorithm(cpu, torch.Size([1024, 16, 512])) is scan.Sequential
    assert scan.algorithm(cpu) is scan.Sequential
    assert scan.algorithm(torch.device("meta"), torch.Size([16384, 1, 192])) is scan.HillisSteele


def test_linear_scan_chooses_by_the_broadcast_shape():
    """A decay shared by channels (``a [T, 2, 1]`` against ``b [T, 2, 3]``) over 300 steps: ``linear_scan`` takes
    ``TwoLevel`` by the states' shape, and its states and gradients equal the loop's."""
    assert scan.algorithm(torch.device("cpu"), torch.broadcast_shapes((300, 2, 1), (300, 2, 3))) is scan.TwoLevel
    g = torch.Generator().manual_seed(2)
    a = (0.5 + 0.5 * torch.rand(300, 2, 1, generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.randn(300, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 2, 3, generator=g, dtype=torch.float64)
    got, expected = linear_scan(a, b), linear_recurrence_loop(a, b)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for x, y in zip(torch.autograd.grad((got * w).sum(), (a, b)), torch.autograd.grad((expected * w).sum(), (a, b)),
                    strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
