"""The linear recurrence ``h_t = a_t h_{t-1} + b_t`` for a graph of symbolic length: ``graph_scans(max_len)``.

Both of ``chimera.models.scan``'s algorithms loop in Python over the length (``Sequential``: one step per position;
``HillisSteele``: ``ceil(log2 T)`` rounds), so a graph traced at one prompt length would hold that length's loop
only. While exporting, ``graph_scans`` swaps in ``PaddedScan``: the inputs padded along time to a fixed ``P`` (with
zeros: a Hillis-Steele round combines each position with an earlier one only, so what lies beyond ``T`` never reaches
the first ``T`` states), ``log2 P`` rounds of fixed shapes (the same associative combination), and the first ``T``
states kept. ``P`` is the decoding cache's length
rounded up to a power of two: no scanned length (positions, or chunks of them) exceeds it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from chimera.models import scan


class PaddedScan:
    def __init__(self, length: int):
        self.length = 1 << max(0, (length - 1).bit_length())  # P: a power of two >= length

    def states(self, a: torch.Tensor, b: torch.Tensor, mul=torch.mul) -> torch.Tensor:
        """All states of ``h_t = a_t h_{t-1} + b_t`` along dim 0, ``h_{-1} = 0`` (``mul``: as
        ``HillisSteele.states``)."""
        shape = torch.broadcast_shapes(a.shape, b.shape)
        a, b = a.expand(shape), b.expand(shape)
        steps, P = shape[0], self.length
        torch._check(steps <= P)
        pad = (P - steps, *shape[1:])
        a, b = torch.cat([a, a.new_zeros(pad)]), torch.cat([b, b.new_zeros(pad)])
        return scan.hillis_steele(a, b, mul)[:steps]


@contextmanager
def graph_scans(max_len: int):
    """Within: every linear scan of ``chimera.models`` (the generic ``linear_scan`` and S5's associative scan, which
    calls ``HillisSteele`` directly) is a ``PaddedScan`` of ``max_len``."""
    padded = PaddedScan(max_len)
    algorithm, hillis_steele = scan.algorithm, scan.HillisSteele.states
    scan.algorithm = lambda device, shape=None: padded
    scan.HillisSteele.states = staticmethod(padded.states)
    try:
        yield padded
    finally:
        scan.algorithm, scan.HillisSteele.states = algorithm, staticmethod(hillis_steele)
