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


def check_eval(run_dir: str, suite: str, option_items: list[str], out: str | None) -> dict:
    """The checks of ``chimera eval`` before any model is loaded (a ``UserError`` each): the suite exists, its
    options are valid, ``--out`` is not a directory, the run has a valid checkpoint. Returns the options."""
    from chimera.configs.loader import validated
    from chimera.evaluation.suites import SUITES
    from chimera.trainer.checkpoint import resolve_checkpoint

    if suite not in SUITES:
        raise UserError(f"unknown eval suite {suite!r}; choose one of {', '.join(SUITES)}")
    options = parse_options(option_items)
    validated(SUITES[suite][1], options, prefix=f"{suite} option ")
    if out is not None and Path(out).is_dir():
        raise UserError(f"--out {out!r} is a directory; give the path of a JSON file")
    resolve_checkpoint(run_dir)
    return options


def run_eval(run_dir: str, suite: str, option_items: list[str], out: str | None) -> int:
    from chimera.evaluation.ranks import is_main
    from chimera.evaluation.suites import run_suite
    from chimera.evaluation.table import format_result
    from chimera.evaluation.target import load_target

    options = check_eval(run_dir, suite, option_items, out)
    result = run_suite(suite, load_target(run_dir), options)
    if not is_main():  # every rank holds the whole result (chimera.evaluation.ranks); rank 0 reports it
        return 0
    print(format_result(result))
    if out is not None:
        write_json(out, result)
        print(f"chimera: wrote {out}")
    return 0
