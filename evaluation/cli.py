"""``chimera eval RUN_DIR --suite SUITE [--set OPTION=VALUE ...] [--out results.json]``."""

from __future__ import annotations

import json
from pathlib import Path

from chimera.errors import UserError


def parse_options(items: list[str]) -> dict:
    import yaml

    options = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r} is not of the form option=value")
        key, raw = item.split("=", 1)
        try:
            options[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            options[key.strip()] = raw
    return options


def write_json(path: str | Path, data: dict) -> None:
    """Written under a temporary name and renamed: a failed run leaves no half file."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def run_eval(run_dir: str, suite: str, option_items: list[str], out: str | None) -> int:
    from chimera.evaluation.suites import SUITES, run_suite
    from chimera.evaluation.table import format_result
    from chimera.evaluation.target import load_target

    if suite not in SUITES:
        raise UserError(f"unknown eval suite {suite!r}; choose one of {', '.join(SUITES)}")
    options = parse_options(option_items)
    if out is not None and Path(out).is_dir():
        raise UserError(f"--out {out!r} is a directory; give the path of a JSON file")
    result = run_suite(suite, load_target(run_dir), options)
    print(format_result(result))
    if out is not None:
        write_json(out, result)
        print(f"chimera: wrote {out}")
    return 0
