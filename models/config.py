"""``model:`` of a run file: the model's own fields, and the fields each sublayer kind declares in its file.

``ModelConfig`` is assembled from the registry (``chimera.models.registry``): the fields below
(vocabulary, width, the layer pattern, shared blocks), the numerics of ``chimera.models.numerics``
and every field a ``SublayerSpec.config`` or ``SharedBlockStyle.config`` declares. The keys stay
flat, so a preset reads as one list of settings. A field two kinds share (``conv_kernel``,
``num_heads``) must be declared alike in both, or the registry refuses to assemble the config.

Once validated, ``cfg.sublayer(symbol)`` is that kind's typed config with its derived values
resolved, ``cfg.numerics`` the model-wide scalars and ``cfg.style`` the shared-block style.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo

from chimera.models import registry
from chimera.models.numerics import Numerics
from chimera.models.patching import ByteLatentConfig
from chimera.models.spec import ModelFields, SharedBlockStyle, SublayerConfig, divisibility


class ModelCore(ModelFields):
    """Architecture. A preset (configs/presets/NAME.yaml) fills these; the run file may override any."""

    preset: str | None = Field(None, description="preset this model was built from")
    name: str = "custom"
    family: str | None = Field(None, description="the HF architecture this model corresponds to (for export)")
    pattern: str = Field(..., min_length=1, description="layer pattern, one symbol per sublayer")
    num_layers: int | None = Field(None, ge=1, description="repeat `pattern` cyclically to this many sublayers")
    vocab_size: int = Field(..., ge=2)
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)
    shared_blocks: list[str] = Field(
        default_factory=list, description="patterns of shared blocks; symbol '0', '1' in `pattern` applies one"
    )
    shared_block_style: str = Field("residual", description="how a shared block runs: one of the styles of "
                                    "chimera.models.shared (residual, zamba)")
    byte_latent: ByteLatentConfig | None = Field(
        None, description="run on bytes: entropy-model patches, a local encoder and decoder, the pattern over patches")

    _resolved: dict = PrivateAttr(default_factory=dict)

    # ---- the pattern -----------------------------------------------------------------------------

    @property
    def layers(self) -> str:
        """The expanded layer pattern: one symbol per sublayer, stage boundaries removed."""
        return self.staged_pattern.replace("|", "")

    @property
    def staged_pattern(self) -> str:
        """The expanded layer pattern with its pipeline stage boundaries ``|``: ``pattern`` repeated cyclically
        (boundaries included) to ``num_layers`` sublayers; boundaries at either end dropped."""
        if self.num_layers is None:
            return self.pattern.strip("|")
        out, count, i = [], 0, 0
        while count < self.num_layers:
            symbol = self.pattern[i % len(self.pattern)]
            out.append(symbol)
            count += symbol != "|"
            i += 1
        return "".join(out).strip("|")

    @property
    def stage_patterns(self) -> list[str] | None:
        """The sublayers of each pipeline stage when the pattern marks stage boundaries with ``|`` (Megatron-Core's
        hybrid-pattern convention), else None (stages are then cut by cost)."""
        staged = self.staged_pattern
        return staged.split("|") if "|" in staged else None

    def layer_units(self, staged: bool = False) -> list[str]:
        """The symbols of each module of the layer stack: one sublayer each, except that a use of a shared block
        whose style feeds the next sublayer is one module with it (``'0m'``). With ``staged``, ``'|'`` entries
        mark the pipeline stage boundaries of the pattern."""
        feeds_next = self.style.feeds_next
        units, pending = [], ""
        for symbol in (self.staged_pattern if staged else self.layers):
            if symbol in registry.SHARED_SYMBOLS and feeds_next:
                pending = symbol
                continue
            units.append(pending + symbol)
            pending = ""
        return units

    @property
    def symbols(self) -> set[str]:
        """The sublayer kinds of this model, its shared blocks' included."""
        return set(self.layers) | set("".join(self.shared_blocks))

    def kinds(self) -> list[str]:
        """This model's sublayer kinds, in registry order (the order of checks)."""
        return [s for s in registry.sublayers() if s in self.symbols]

    # ---- resolved views --------------------------------------------------------------------------

    def sublayer(self, symbol: str) -> SublayerConfig:
        """The typed config of sublayer kind ``symbol``, derived values resolved (validated with the model
        for the kinds it has; on first use for another)."""
        if symbol not in self._resolved:
            self._resolved[symbol] = _view(registry.sublayers()[symbol].config, self.model_dump())
        return self._resolved[symbol]

    @property
    def numerics(self) -> Numerics:
        return self._resolved["numerics"]

    @property
    def style(self) -> SharedBlockStyle:
        return registry.shared_styles()[self.shared_block_style]

    @property
    def style_config(self) -> SublayerConfig:
        return self._resolved["style"]

    def _views(self) -> list[SublayerConfig]:
        views = [self._resolved[s] for s in self.kinds()]
        return views + ([self.style_config] if self.shared_blocks else [])

    def uses(self, field: str) -> bool:
        """Whether this model reads ``field``: one of its own, or one a sublayer kind it has declares."""
        if field in ModelCore.model_fields or field in Numerics.model_fields:
            return True
        return any(field in type(view).model_fields for view in self._views())

    def effective(self, field: str):
        """``field``'s value as the model uses it: a default derived from other fields resolved."""
        for view in self._views():
            if field in type(view).model_fields:
                return getattr(view, field)
        return getattr(self, field)

    def check_tensor_parallel(self, tp: int) -> str | None:
        """The first thing a tensor-parallel size ``tp`` does not divide (a message), or None."""
        for symbol in self.kinds():
            problem = registry.sublayers()[symbol].check_tensor_parallel(self.sublayer(symbol), tp)
            if problem:
                return problem
        if self.shared_blocks:
            problem = self.style.check_tensor_parallel(self.style_config, tp)
            if problem:
                return problem
        if self.byte_latent is not None:
            for part in (self.entropy_model, self.local_model):
                problem = part.check_tensor_parallel(tp)
                if problem:
                    return problem
        return divisibility(tp, {"model.vocab_size": self.vocab_size})  # the embedding's and the head's rows

    @property
    def entropy_model(self) -> ModelCore:
        """The byte-latent model's entropy model (a small causal byte LM)."""
        return self._resolved["entropy_model"]

    @property
    def local_model(self) -> ModelCore:
        """The byte-latent model's local encoder and decoder: one byte-level stack, encoder layers first."""
        return self._resolved["local_model"]

    def _byte_latent_part(self, field: str, defaults: dict, fixed: dict) -> ModelCore:
        """A byte-latent part's config: the global model's fields, then ``defaults``, the part's own fields
        (``byte_latent.<field>``), then ``fixed``."""
        own = getattr(self.byte_latent, field)
        data = {k: v for k, v in self.model_dump().items() if k not in ("byte_latent", "preset", "name", "num_layers")}
        width = own.get("d_model", defaults["d_model"])
        data.update(defaults, mlp_hidden=2 * width)
        data.update(own, **fixed)
        try:
            return type(self).model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"byte_latent.{field}.{where}: bad value {first.get('input')!r}: "
                             f"{first['msg'].removeprefix('Value error, ')}") from None

    def check_expert_parallel(self, ep: int) -> str | None:
        """What an expert-parallel size ``ep`` does not divide (a message), or None."""
        rules = [(s, registry.sublayers()[s].check_expert_parallel) for s in self.kinds()]
        rules = [(s, rule) for s, rule in rules if rule is not None]
        if not rules:
            return (f"parallel.expert={ep} but the model has no sublayer with experts (pattern {self.pattern!r}); "
                    "set parallel.expert=1")
        for symbol, rule in rules:
            problem = rule(self.sublayer(symbol), ep)
            if problem:
                return problem
        return None

    # ---- validation ------------------------------------------------------------------------------

    @model_validator(mode="after")
    def _check(self):
        self._check_pattern()
        data = self.model_dump()
        self._check_style_fields(data)
        resolved = {"numerics": _view(Numerics, data)}
        for symbol in self.kinds():
            resolved[symbol] = _view(registry.sublayers()[symbol].config, data)
        resolved["style"] = _view(self.style.config, data)
        self._resolved = resolved
        self.style.check(self)
        if self.byte_latent is not None:
            bl = self.byte_latent
            units = len(self.layer_units())
            if bl.merge_after is not None and bl.merge_after > units:
                raise ValueError(f"byte_latent.merge_after={bl.merge_after} but the global model has {units} layers; "
                                 f"use at most {units}")
            resolved["entropy_model"] = self._byte_latent_part(
                "entropy_model", {"d_model": 32, "pattern": "H-", "num_layers": 2}, {"byte_latent": None})
            resolved["local_model"] = self._byte_latent_part(
                "local_model", {"d_model": 32, "pattern": "H-"},
                {"byte_latent": None, "num_layers": bl.encoder_layers + bl.decoder_layers,
                 "vocab_size": self.vocab_size})
        return self

    def _check_pattern(self) -> None:
        known = registry.symbols()
        for i, block in enumerate(self.shared_blocks):
            if set(block) - set(registry.sublayers()):
                raise ValueError(f"shared_blocks[{i}] = {block!r}: use the layer symbols, without shared ones")
        used = {int(c) for c in self.pattern if c in registry.SHARED_SYMBOLS}
        if used and max(used) >= len(self.shared_blocks):
            raise ValueError(f"pattern uses shared block {max(used)} but shared_blocks has {len(self.shared_blocks)}")
        bad = sorted(set(self.pattern) - set(known) - {"|"})
        if bad:
            allowed = ", ".join(f"'{k}' ({v})" for k, v in known.items())
            raise ValueError(f"unknown layer symbol(s) {bad} in pattern {self.pattern!r}; allowed: {allowed}")
        if not self.pattern.replace("|", ""):
            raise ValueError(f"pattern {self.pattern!r} has no sublayers")
        stages = self.stage_patterns
        if stages is not None and not all(stages):
            empty = stages.index("")
            raise ValueError(f"pattern {self.pattern!r}: pipeline stage {empty} has no layers (two '|' in a row); "
                             "put at least one sublayer between stage boundaries")

    def _check_style_fields(self, data: dict) -> None:
        """A field only another shared-block style reads is a mistake (styles are alternatives)."""
        mine = set(self.style.config.model_fields)
        for name, style in registry.shared_styles().items():
            if name == self.shared_block_style:
                continue
            theirs = set(style.config.model_fields) - mine - set(ModelFields.model_fields)
            for sublayer in registry.sublayers().values():
                theirs -= set(sublayer.config.model_fields)
            set_here = [f for f in sorted(theirs) if data[f] != _default(style.config.model_fields[f])]
            if set_here:
                raise ValueError(f"{' / '.join(set_here)} need shared_block_style: {name}")


def _default(field: FieldInfo):
    return field.get_default(call_default_factory=True)


def _view(cls: type[SublayerConfig], data: dict) -> SublayerConfig:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise ValueError(first["msg"].removeprefix("Value error, ")) from None


def _same(a: FieldInfo, b: FieldInfo) -> bool:
    return a.annotation == b.annotation and _default(a) == _default(b) and a.metadata == b.metadata


def _declared_fields() -> dict[str, tuple[Any, FieldInfo]]:
    """Every field a sublayer kind, a shared-block style or the numerics declare beyond ModelCore's."""
    owners: list[tuple[str, type[SublayerConfig]]] = [("numerics", Numerics)]
    owners += [(f"sublayer {s!r}", spec.config) for s, spec in registry.sublayers().items()]
    owners += [(f"shared_block_style {n!r}", st.config) for n, st in registry.shared_styles().items()]
    fields: dict[str, tuple[str, FieldInfo]] = {}
    for owner, cls in owners:
        for name, info in cls.model_fields.items():
            if name in ModelCore.model_fields:
                if not _same(info, ModelCore.model_fields[name]):
                    raise RuntimeError(f"{owner} declares model.{name} unlike the model's own field")
                continue
            if name in fields and not _same(info, fields[name][1]):
                raise RuntimeError(f"{owner} declares model.{name} unlike {fields[name][0]} does "
                                   f"(type, default and bounds must agree)")
            fields.setdefault(name, (owner, info))
    return {name: (info.annotation, info) for name, (_, info) in fields.items()}


def _assemble():
    styles = tuple(registry.shared_styles())
    return create_model(
        "ModelConfig",
        __base__=ModelCore,
        __doc__=ModelCore.__doc__,
        shared_block_style=(Literal[styles], Field("residual", description=ModelCore.model_fields[
            "shared_block_style"].description)),
        **_declared_fields(),
    )


ModelConfig = _assemble()
