"""A mapping's one name table: Chimera tensors <-> transformers tensors, each row with an invertible transform.

A mapping gives ``table(cfg)``, a list of ``Entry`` rows. Each row names Chimera tensors and HF
tensors and how the HF ones are made from ours (``to_hf``); how ours are made from the HF ones is
the transform's inverse, derived (``to_ours``), never written a second time. The transforms::

    Same()                  x                          a rename
    Negate()                -x                         (RecurrentGemma's -Lambda)
    Unsqueeze(d)            x.unsqueeze(d)             ([c, k] convs stored [c, 1, k])
    View(shape)             x.reshape(shape)           ([H P, r] stored [H, P, r])
    Regroup(shape, perm)    rows regrouped             (Mamba-2's B/C order: [G, (B, C), N] <-> [(B, C), G, N])
    Concat(d, parts)        cat(parts_i(x_i), d)       several of ours fused into one (in_proj, gate_up)
    Interleave(d)           rows x_0, z_0, x_1, ...    (Zamba's in_proj)
    Unstack()               x[0], x[1], ...            one of ours [E, ...], one HF tensor per expert
    Chain(t1, t2)           t2(t1(x))

Rows also say when they apply: ``export=False`` rows are only read; on import a row is ``required``,
or an optional copy of another row's tensor: ``checked`` (must equal it: a shared block copied at
every use), ``preferred`` (replaces it when present: a use's own adapters) or ``ignored``. HF shapes are
derived too: the table applied to meta tensors of the model's shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from chimera.errors import UserError

Tensors = list[torch.Tensor]


class Transform:
    """``to_hf(ours) -> hf``; ``to_ours(hf, like) -> ours`` with ``like`` tensors of our shapes (meta is enough)."""

    def to_hf(self, ours: Tensors) -> Tensors:
        raise NotImplementedError

    def to_ours(self, hf: Tensors, like: Tensors) -> Tensors:
        raise NotImplementedError


class Same(Transform):
    def to_hf(self, ours):
        return list(ours)

    def to_ours(self, hf, like):
        return list(hf)


class Negate(Transform):
    def to_hf(self, ours):
        return [-ours[0]]

    def to_ours(self, hf, like):
        return [-hf[0]]


@dataclass(frozen=True)
class Unsqueeze(Transform):
    dim: int

    def to_hf(self, ours):
        return [ours[0].unsqueeze(self.dim)]

    def to_ours(self, hf, like):
        return [hf[0].squeeze(self.dim)]


@dataclass(frozen=True)
class View(Transform):
    shape: tuple[int, ...]

    def to_hf(self, ours):
        return [ours[0].reshape(self.shape)]

    def to_ours(self, hf, like):
        return [hf[0].reshape(like[0].shape)]


@dataclass(frozen=True)
class Regroup(Transform):
    """Dim 0 seen as ``shape``, its factors permuted by ``perm`` (HF order = ours permuted)."""

    shape: tuple[int, ...]
    perm: tuple[int, ...]

    def _move(self, t: torch.Tensor, shape, perm) -> torch.Tensor:
        n = len(shape)
        return t.unflatten(0, shape).permute(*perm, *range(n, t.dim() + n - 1)).flatten(0, n - 1)

    def to_hf(self, ours):
        return [self._move(ours[0], self.shape, self.perm)]

    def to_ours(self, hf, like):
        inverse = tuple(self.perm.index(i) for i in range(len(self.perm)))
        return [self._move(hf[0], tuple(self.shape[p] for p in self.perm), inverse)]


@dataclass(frozen=True)
class Concat(Transform):
    """Several of ours, each through its part's transform, concatenated along ``dim`` into one HF tensor."""

    dim: int = 0
    parts: tuple[Transform, ...] | None = None  # default: Same for each

    def _parts(self, n: int) -> Sequence[Transform]:
        return self.parts or [Same()] * n

    def to_hf(self, ours):
        return [torch.cat([p.to_hf([x])[0] for p, x in zip(self._parts(len(ours)), ours, strict=True)], self.dim)]

    def to_ours(self, hf, like):
        parts = self._parts(len(like))
        sizes = [p.to_hf([x])[0].shape[self.dim] for p, x in zip(parts, like, strict=True)]
        pieces = hf[0].split(sizes, self.dim)
        return [p.to_ours([piece], [x])[0] for p, piece, x in zip(parts, pieces, like, strict=True)]


@dataclass(frozen=True)
class Interleave(Transform):
    """Several of ours interleaved along ``dim``: HF row ``n i + j`` is row ``i`` of ours ``j``."""

    dim: int = 0

    def to_hf(self, ours):
        return [torch.stack(ours, self.dim + 1).flatten(self.dim, self.dim + 1)]

    def to_ours(self, hf, like):
        return list(hf[0].unflatten(self.dim, (-1, len(like))).unbind(self.dim + 1))


class Unstack(Transform):
    """One of ours ``[E, ...]`` as ``E`` HF tensors (transformers' per-expert names)."""

    def to_hf(self, ours):
        return list(ours[0].unbind(0))

    def to_ours(self, hf, like):
        return [torch.stack(hf)]


@dataclass(frozen=True)
class Chain(Transform):
    first: Transform
    then: Transform

    def to_hf(self, ours):
        return self.then.to_hf(self.first.to_hf(ours))

    def to_ours(self, hf, like):
        return self.first.to_ours(self.then.to_ours(hf, self.first.to_hf(like)), like)


Import = Literal["required", "checked", "preferred", "ignored"]


@dataclass(frozen=True)
class Entry:
    ours: tuple[str, ...]
    hf: tuple[str, ...]
    transform: Transform = field(default_factory=Same)
    export: bool = True  # written by export
    on_import: Import = "required"  # see the module docstring
    note: str = ""  # why copies may differ (for the refusal)


def rename(ours: str, hf: str, transform: Transform | None = None, **kw) -> Entry:
    return Entry((ours,), (hf,), transform or Same(), **kw)


def prefixed(ours: str, hf: str, names: dict[str, str] | Sequence[str]) -> list[Entry]:
    """Renames under two prefixes: ``{hf name: our name}``, or names the same on both sides."""
    pairs = names.items() if isinstance(names, dict) else ((n, n) for n in names)
    return [rename(ours + o, hf + h) for h, o in pairs]


def embeddings(cfg, embed: str, head: str = "lm_head.weight") -> list[Entry]:
    """The token embedding and the LM head: its own tensor when untied, else the embedding (a file may then hold
    ``lm_head.weight`` too, which import ignores: transformers ties it)."""
    if cfg.tie_embeddings:
        return [rename("embed.weight", embed), rename("embed.weight", head, export=False, on_import="ignored")]
    return [rename("embed.weight", embed), rename("head.weight", head)]


def copies(entries: list[Entry], prefix: str, copy_prefix: str, *, export: bool, on_import: Import,
           note: str = "") -> list[Entry]:
    """The rows of ``entries`` whose HF names start with ``prefix`` again, under ``copy_prefix`` instead."""
    out = []
    for e in entries:
        if e.export and all(h.startswith(prefix) for h in e.hf):
            out.append(Entry(e.ours, tuple(copy_prefix + h.removeprefix(prefix) for h in e.hf), e.transform,
                             export=export, on_import=on_import, note=note))
    return out


# ---- applying a table ----------------------------------------------------------------------------

def _meta(shapes: dict[str, torch.Size], names: Sequence[str]) -> Tensors:
    return [torch.empty(shapes[n], device="meta") for n in names]


def hf_shapes(table: list[Entry], ours: dict[str, torch.Size]) -> dict[str, tuple[int, ...]]:
    """Every HF name the table knows, with the shape it has for a model of full shapes ``ours``."""
    out = {}
    for e in table:
        for name, t in zip(e.hf, e.transform.to_hf(_meta(ours, e.ours)), strict=True):
            out[name] = tuple(t.shape)
    return out


def check_shapes(state: dict[str, torch.Tensor], expected: dict, where: str, optional: dict | None = None) -> None:
    """Names and shapes must match exactly; ``optional`` names (with their shapes) may be present too."""
    optional = optional or {}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - set(optional))
    if missing or unexpected:
        raise UserError(f"{where}: tensors do not match the config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, shape in {**expected, **optional}.items():
        if name in state and tuple(state[name].shape) != tuple(shape):
            raise UserError(f"{where}: {name} has shape {tuple(state[name].shape)} but the config implies "
                            f"{tuple(shape)}")


def to_ours(table: list[Entry], tensors: dict[str, torch.Tensor], ours: dict[str, torch.Size],
            where: str) -> dict[str, torch.Tensor]:
    """An HF state dict -> our full state dict, after checking its names and shapes against the table."""
    shapes = hf_shapes(table, ours)
    required = {n for e in table if e.on_import == "required" for n in e.hf}
    # in table order, so that the first mismatch reported is the same in every process (a set's order is not)
    check_shapes(tensors, {n: s for n, s in shapes.items() if n in required}, where,
                 optional={n: s for n, s in shapes.items() if n not in required})
    out: dict[str, torch.Tensor] = {}
    for role in ("required", "preferred", "checked"):
        for e in (e for e in table if e.on_import == role):
            if not all(n in tensors for n in e.hf):
                continue
            values = e.transform.to_ours([tensors[n] for n in e.hf], _meta(ours, e.ours))
            for name, value in zip(e.ours, values, strict=True):
                if role == "checked" and not torch.equal(out[name], value):
                    raise UserError(f"{e.hf[0]} is a copy of a tensor held once ({name}) and differs from it: this "
                                    f"checkpoint's copies are not shared, and Chimera's are{e.note}")
                out[name] = value
    missing = sorted(set(ours) - set(out))
    if missing:
        raise UserError(f"{where}: no tensor maps to {missing[:3]}")
    return out


def to_hf(table: list[Entry], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our full state dict -> the HF state dict of the rows that export (each tensor its own memory)."""
    out, seen = {}, set()
    for e in (e for e in table if e.export):
        for name, t in zip(e.hf, e.transform.to_hf([state[n] for n in e.ours]), strict=True):
            t = t.contiguous()
            storage = t.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
                t = t.clone()  # safetensors stores no shared memory, nor part of a tensor's
            seen.add(t.untyped_storage().data_ptr())
            out[name] = t
    return out
