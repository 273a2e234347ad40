"""Complex numbers as real pairs (chimera.models.complex_pairs) against torch's complex arithmetic."""

import torch

from chimera.models import complex_pairs as cx


def _pairs(seed, *shape):
    return torch.randn(*shape, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_arithmetic_equals_torch_complex():
    a, b = _pairs(0, 5, 3), _pairs(1, 3)  # broadcasting
    za, zb = torch.view_as_complex(a), torch.view_as_complex(b)
    for got, expected in ((cx.mul(a, b), za * zb), (cx.div(a, b), za / zb), (cx.exp(a), torch.exp(za)),
                          (cx.conj(a), za.conj())):
        torch.testing.assert_close(torch.view_as_complex(got.contiguous()), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cx.abs(a), za.abs(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cx.as_complex(cx.real(a[..., 0])), a[..., 0].to(torch.complex128))
    assert torch.equal(cx.as_pairs(cx.as_complex(a)), a)
