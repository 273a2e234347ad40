"""Reading a run: YAML file + model preset + ``--set a.b=c`` overrides -> validated ``RunConfig``.

Errors are ``UserError`` with one line naming the field path, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from chimera.configs.schema import ModelConfig, RunConfig
from chimera.errors import UserError

PRESET_DIR = "presets"


def preset_names() -> list[str]:
    root = resources.files("chimera.configs") / PRESET_DIR
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    path = resources.files("chimera.configs") / PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown model preset {name!r}; `chimera models` lists them: {', '.join(preset_names())}")
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("name", name)
    data["preset"] = name
    return data


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist; pass the path of a YAML run file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"config file {str(path)!r} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of sections (model, data, train, ...)")
    return data


def _field_annotation(keys: list[str]):
    """The type annotation of the config field at ``keys`` (None where the path is not a typed field)."""
    node = RunConfig
    annotation = None
    for key in keys:
        fields = getattr(node, "model_fields", None)
        if fields is None or key not in fields:
            return None
        annotation = fields[key].annotation
        node = annotation
    return annotation


def _is_text(annotation) -> bool:
    """A field that holds text (``str`` or ``str | None``)."""
    if annotation is str:
        return True
    args = typing.get_args(annotation)
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and str in args and all(
        a in (str, type(None)) for a in args)


def _parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value``: text fields take the value as given (a pattern ``-`` or ``|`` is text, not YAML); others parse
    it as YAML (numbers, booleans, lists, mappings, null)."""
    if "=" not in item:
        raise UserError(f"--set {item!r} is not of the form a.b=value")
    key, raw = item.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise UserError(f"--set {item!r}: empty field name in {key!r}")
    if _is_text(_field_annotation(keys)) and raw.strip() not in ("null", "~"):
        return keys, raw.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {item!r}: {k!r} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


def _resolve_model(data: dict[str, Any]) -> dict[str, Any]:
    """`model: NAME` or `model: {preset: NAME, ...overrides}` -> the full model mapping."""
    model = data.get("model")
    if isinstance(model, dict) and model.get("preset"):
        merged = load_preset(model["preset"])
        merged.update({k: v for k, v in model.items() if k != "preset"})
        model = merged
    if model is not None:
        data["model"] = model
    return data


def format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{path}: unknown field (value {first.get('input')!r}); check the spelling or remove it"
    if first["type"] == "missing":
        return f"{path}: required field is missing"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{path}: bad value {first.get('input')!r}: {msg}{more}"


def validated(model_cls, data: dict[str, Any], prefix: str = ""):
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise UserError(prefix + format_validation_error(e)) from None


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    data = _read_yaml(path)
    if isinstance(data.get("model"), str):
        data["model"] = {"preset": data["model"]}
    data = apply_overrides(data, list(overrides))
    if isinstance(data.get("model"), str):  # --set model=NAME: another preset
        data["model"] = {"preset": data["model"]}
    return validated(RunConfig, _resolve_model(data))


def load_model_config(preset: str, overrides: list[str] = ()) -> ModelConfig:
    data = apply_overrides(load_preset(preset), list(overrides))
    return validated(ModelConfig, data, prefix="model.")
