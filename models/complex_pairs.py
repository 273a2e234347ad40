"""Complex numbers held as real pairs ``[..., 2]`` (real part, imaginary part).

ONNX has no complex element type, so the mixers whose math is complex (S5's diagonal SSM, the modal Hyena filter)
compute in pairs: their exported graphs trace the same code as training. Where a kernel or a collective takes torch
complex tensors (the scans' Triton kernels, the context-parallel fold), ``as_complex`` / ``as_pairs`` cross over,
without copying."""

from __future__ import annotations

import torch


def mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a b`` (broadcasting)."""
    (ar, ai), (br, bi) = a.unbind(-1), b.unbind(-1)
    return torch.stack([ar * br - ai * bi, ar * bi + ai * br], -1)


def div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b = a conj(b) / |b|^2``."""
    return mul(a, conj(b)) / (b * b).sum(-1, keepdim=True)


def conj(z: torch.Tensor) -> torch.Tensor:
    return z * z.new_tensor([1.0, -1.0])


def exp(z: torch.Tensor) -> torch.Tensor:
    """``e^z = e^{Re z} (cos Im z + i sin Im z)``."""
    re, im = z.unbind(-1)
    magnitude = torch.exp(re)
    return torch.stack([magnitude * torch.cos(im), magnitude * torch.sin(im)], -1)


def abs(z: torch.Tensor) -> torch.Tensor:  # noqa: A001 - the complex modulus, as torch names it
    return torch.linalg.vector_norm(z, dim=-1)


def real(x: torch.Tensor) -> torch.Tensor:
    """A real tensor as complex pairs (imaginary part 0)."""
    return torch.stack([x, torch.zeros_like(x)], -1)


def as_complex(z: torch.Tensor) -> torch.Tensor:
    return torch.view_as_complex(z.contiguous())


def as_pairs(z: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(z)
