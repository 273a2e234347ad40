"""Results as a terminal table: one line per row, the columns of the first row."""

from __future__ import annotations

import math


def _cell(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, (list, tuple)):
        return "-".join(map(str, value)) if len(value) == 2 else ",".join(map(str, value))
    return str(value)


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def format_result(result: dict) -> str:
    target = result.get("target", {})
    head = (f"{result['suite']}: {target.get('model', '?')} ({target.get('parameters', 0):,} parameters), "
            f"checkpoint step {target.get('step', '?')}")
    summary = ", ".join(f"{k} {_cell(v)}" for k, v in result.get("summary", {}).items())
    lines = [head, format_table(result["rows"]), f"summary: {summary}"]
    lines += [f"skipped: {s}" for s in result.get("skipped", [])]
    return "\n".join(lines)
