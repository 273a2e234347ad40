"""The parallel scan equals the step-by-step linear recurrence."""

import pytest
import torch

from chimera.models.scan import linear_recurrence_loop, linear_scan


@pytest.mark.parametrize("length", [1, 2, 7, 64, 100])
@pytest.mark.parametrize("with_h0", [False, True])
def test_scan_equals_loop(length, with_h0):
    g = torch.Generator().manual_seed(length)
    a = torch.rand(length, 3, 5, generator=g, dtype=torch.float64)
    b = torch.randn(length, 3, 5, generator=g, dtype=torch.float64)
    h0 = torch.randn(3, 5, generator=g, dtype=torch.float64) if with_h0 else None
    torch.testing.assert_close(linear_scan(a, b, h0), linear_recurrence_loop(a, b, h0), rtol=1e-12, atol=1e-12)


def test_scan_gradients_match_loop():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(33, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(33, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(33, 4, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((linear_scan(a, b) * w).sum(), (a, b))
    gl = torch.autograd.grad((linear_recurrence_loop(a, b) * w).sum(), (a, b))
    for x, y in zip(ga, gl):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_scan_is_stable_for_long_sequences():
    # decays near 1 over 4096 steps: a cumulative-log formulation would overflow in fp32
    a = torch.full((4096, 2), 0.999)
    b = torch.ones(4096, 2)
    h = linear_scan(a, b)
    expected = (1 - 0.999 ** torch.arange(1, 4097, dtype=torch.float64)) / (1 - 0.999)
    torch.testing.assert_close(h[:, 0].double(), expected, rtol=1e-4, atol=1e-3)
