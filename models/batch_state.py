"""The rows of a decoding state: which dimension of each state tensor is the batch, taking rows out, putting them
back, stacking states of separate batches into one.

A decoding state (``init_state``) nests lists and dicts of tensors (and plain values). Its *layout* has the same
structure with, at each tensor, the dimension that grows with the batch (``None``: shared by the rows), and ``ROWS``
at a list holding one entry per row (the byte-latent model's). It is found by building the state for one row and
for two: the dimension that differs is the batch's.
"""

from __future__ import annotations

import torch

ROWS = "rows"  # a list with one entry per row


def _layout(one, two):
    if isinstance(one, dict):
        return {k: _layout(one[k], two[k]) for k in one}
    if isinstance(one, (list, tuple)):
        if len(one) != len(two):
            return ROWS
        return [_layout(a, b) for a, b in zip(one, two)]
    if isinstance(one, torch.Tensor):
        grown = [d for d in range(one.dim()) if one.shape[d] != two.shape[d]]
        return grown[0] if grown else None
    return None


def state_layout(model) -> object:
    """The batch dimension of every tensor of ``model``'s decoding state (see the module's docstring); cached."""
    cached = getattr(model, "_state_layout", None)
    if cached is None:
        cached = _layout(model.init_state(1, 2), model.init_state(2, 2))
        object.__setattr__(model, "_state_layout", cached)  # not a submodule nor a parameter
    return cached


def take_rows(state, layout, rows: torch.Tensor):
    """A new state holding only ``rows`` (``LongTensor``, in that order) of ``state``."""
    if layout == ROWS:
        return [state[i] for i in rows.tolist()]
    if isinstance(state, dict):
        return {k: take_rows(v, layout[k], rows) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(take_rows(v, d, rows) for v, d in zip(state, layout))
    if isinstance(state, torch.Tensor):
        return state.clone() if layout is None else state.index_select(layout, rows.to(state.device))
    return state


def put_rows(state, layout, rows: torch.Tensor, part) -> None:
    """Write ``part`` (a state of ``len(rows)`` rows) back into ``rows`` of ``state``, in place."""
    if layout == ROWS:
        for i, row in zip(rows.tolist(), part):
            state[i] = row
        return
    keys = state.keys() if isinstance(state, dict) else range(len(state))
    for k in keys:
        here, d = state[k], layout[k]
        if isinstance(here, torch.Tensor):
            if d is None:
                state[k] = part[k]
            else:
                state[k] = here.index_copy(d, rows.to(here.device), part[k].to(here.dtype))
        elif isinstance(here, (dict, list)):
            put_rows(here, d, rows, part[k])
        else:
            state[k] = part[k]


def stack_states(states: list, layout):
    """One state whose rows are those of ``states`` in turn (each a state of the same model and ``max_len``)."""
    first = states[0]
    if layout == ROWS:
        return [row for s in states for row in s]
    if isinstance(first, dict):
        return {k: stack_states([s[k] for s in states], layout[k]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(stack_states([s[i] for s in states], layout[i]) for i in range(len(first)))
    if isinstance(first, torch.Tensor):
        if layout is None:
            if not all(torch.equal(first, s) for s in states[1:]):
                raise ValueError("states differ in a tensor the rows share: they cannot be stacked")
            return first.clone()
        return torch.cat(states, dim=layout)
    if not all(s == first for s in states[1:]):
        raise ValueError(f"states differ in a value the rows share ({first!r}): they cannot be stacked")
    return first
