"""The first-order linear recurrence ``h_t = a_t * h_{t-1} + b_t``, vectorised over time.

Used by every diagonal linear recurrence (RG-LRU; selective SSMs later). The reference is a
Hillis-Steele parallel scan: ``ceil(log2 T)`` rounds of whole-tensor ops, each combining position
``t`` with ``t - k`` under the associative operator
``(a_1, b_1) . (a_2, b_2) = (a_1 a_2, a_2 b_1 + b_2)``. It only multiplies decays (|a| <= 1), so
it is stable for any length, unlike a cumulative-log formulation.
"""

import torch


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """All states ``h_0..h_{T-1}`` of ``h_t = a_t h_{t-1} + b_t`` along dim 0; ``h_{-1} = h0`` (or 0)."""
    if h0 is not None:
        b = torch.cat([b[:1] + a[:1] * h0.unsqueeze(0), b[1:]])
    T, k = a.shape[0], 1
    while k < T:
        b = torch.cat([b[:k], b[k:] + a[k:] * b[:-k]])
        a = torch.cat([a[:k], a[k:] * a[:-k]])
        k *= 2
    return b


def linear_recurrence_loop(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """The same recurrence one step at a time: the oracle the scan is tested against."""
    h = torch.zeros_like(b[0]) if h0 is None else h0
    out = []
    for t in range(a.shape[0]):
        h = a[t] * h + b[t]
        out.append(h)
    return torch.stack(out)
