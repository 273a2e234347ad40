"""The registry: every sublayer kind and shared-block style, found in its own file.

Each module of ``chimera.models.mixers`` and ``chimera.models.channels`` declares ``SPECS`` (one
``SublayerSpec`` per layer-pattern symbol it implements) and each module of ``chimera.models.shared``
a ``STYLE``; see ``chimera.models.spec``. Adding a mixer is adding one such file: the pattern symbol,
its config fields, its builder and its parallel rules are picked up from there. Modules are read in
name order, packages in the order below; that order is the order of checks and listings.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from chimera.models.spec import SharedBlockStyle, SublayerSpec

SUBLAYER_PACKAGES = ("chimera.models.mixers", "chimera.models.channels")
STYLE_PACKAGE = "chimera.models.shared"
SHARED_SYMBOLS = "01"  # symbol i runs model.shared_blocks[i]
RESERVED = SHARED_SYMBOLS + "|"  # "|": a pipeline stage boundary


def _modules(package: str):
    pkg = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        yield importlib.import_module(f"{package}.{info.name}")


@cache
def sublayers() -> dict[str, SublayerSpec]:
    """Every sublayer kind, by its layer-pattern symbol."""
    found: dict[str, SublayerSpec] = {}
    for package in SUBLAYER_PACKAGES:
        for module in _modules(package):
            specs = getattr(module, "SPECS", None)
            if not specs or not all(isinstance(s, SublayerSpec) for s in specs):
                raise RuntimeError(f"{module.__name__} declares no SPECS (a tuple of SublayerSpec)")
            for spec in specs:
                if len(spec.symbol) != 1 or spec.symbol in RESERVED or spec.symbol in found:
                    taken = found[spec.symbol].summary if spec.symbol in found else "reserved"
                    raise RuntimeError(f"{module.__name__}: layer symbol {spec.symbol!r} is taken ({taken})")
                found[spec.symbol] = spec
    return found


@cache
def shared_styles() -> dict[str, SharedBlockStyle]:
    """Every shared-block style, by name (``model.shared_block_style``)."""
    found: dict[str, SharedBlockStyle] = {}
    for module in _modules(STYLE_PACKAGE):
        style = getattr(module, "STYLE", None)
        if not isinstance(style, SharedBlockStyle):
            raise RuntimeError(f"{module.__name__} declares no STYLE (a SharedBlockStyle)")
        found[style.name] = style
    return found


def symbols() -> dict[str, str]:
    """Every layer-pattern symbol and what it is."""
    out = {s: spec.summary for s, spec in sublayers().items()}
    out.update({s: f"shared block {s} (model.shared_blocks[{s}]: one set of parameters at every use)"
                for s in SHARED_SYMBOLS})
    return out
