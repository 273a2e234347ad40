"""Indexing a tensor at a symbolic integer while ``torch.export`` traces: ``SymbolicIndexing``.

The decoding step indexes its caches at the position (``state["k"][:, :, pos % slots] = k``). Traced with the
position as a symbol (``position.item()``), Python's tensor indexing asks for a plain ``int`` and either fails or
freezes the traced value into the graph. Inside ``SymbolicIndexing`` such an index (basic entries only: slices,
integers, ``...``, ``None``, at least one of them symbolic) is applied one dimension at a time, an integer entry by
``Tensor.select``, which keeps it symbolic; an assignment copies into that view. Any other indexing is untouched.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


def basic_view(x: torch.Tensor, index: tuple) -> torch.Tensor:
    """``x[index]`` for basic entries, one dimension at a time (integers, symbolic or not, by ``select``)."""
    entries = list(index)
    if Ellipsis in entries:
        at = entries.index(Ellipsis)
        used = sum(1 for e in entries if e is not None and e is not Ellipsis)
        entries[at: at + 1] = [slice(None)] * (x.dim() - used)
    dim = 0
    for entry in entries:
        if entry is None:
            x = x.unsqueeze(dim)
            dim += 1
        elif isinstance(entry, slice):
            if entry != slice(None):
                x = x[(slice(None),) * dim + (entry,)]
            dim += 1
        else:
            x = x.select(dim, entry)
    return x


def _symbolic_basic(index) -> tuple | None:
    index = index if isinstance(index, tuple) else (index,)
    basic = all(e is None or e is Ellipsis or isinstance(e, (int, torch.SymInt, slice)) for e in index)
    return index if basic and any(isinstance(e, torch.SymInt) for e in index) else None


class SymbolicIndexing(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            index = _symbolic_basic(args[1])
            if index is not None:
                view = basic_view(args[0], index)
                if func is torch.Tensor.__getitem__:
                    return view
                value = args[2]
                view.copy_(value) if isinstance(value, torch.Tensor) else view.fill_(value)
                return None
        return func(*args, **(kwargs or {}))
