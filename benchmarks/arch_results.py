"""Markdown tables of a ``chimera bench-arch`` results.json (for benchmarks/RESULTS.md).

    python benchmarks/arch_results.py OUT/results.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def main(path: str) -> None:
    results = json.loads(open(path).read())
    runs = results["runs"]
    print(f"Device: {results['device']}, torch {results.get('torch')}, {results['budget']} budget, "
          f"{results['created']}\n")
    models = list(dict.fromkeys(r["model"] for r in runs))
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    by = {(r["model"], r["task"]): r for r in runs}
    print("| model | d_model | parameters | tokens/s (median) | ratio | latency/step | peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    tps = defaultdict(list)
    for r in runs:
        tps[r["model"]].append(r["throughput_tokens_per_s"])
    base = sorted(tps[models[0]])[len(tps[models[0]]) // 2]
    for m in models:
        rs = [r for r in runs if r["model"] == m]
        t = sorted(tps[m])[len(tps[m]) // 2]
        lat = sorted(r["latency_s_per_step"] for r in rs)[len(rs) // 2]
        mem = [r["peak_memory_mb"] for r in rs if r["peak_memory_mb"] is not None]
        print(f"| {m} | {rs[0]['d_model']} | {rs[0]['parameters']:,} | {t:,.0f} | {t / base:.2f} | {lat:.3f} s | "
              f"{fmt(max(mem) if mem else None, 0)} |")
    print("\nAccuracy (MQAR: per-query exact match at the trained cell and grid mean; Chomsky: test lengths 41-500, "
          "in brackets the accuracy at training lengths 1-40) and final training loss:\n")
    print("| task | " + " | ".join(models) + " |")
    print("|---|" + "---:|" * len(models))
    for t in tasks:
        cells = []
        for m in models:
            r = by.get((m, t))
            if r is None:
                cells.append("-")
                continue
            ev = r["eval"]
            if "chomsky" in ev:
                row = ev["chomsky"]["rows"][0]
                cells.append(f"{fmt(row['accuracy'])} ({fmt(row.get('train_length_accuracy'))}); loss "
                             f"{fmt(r['final_loss'])}")
            elif "mqar" in ev:
                rows = ev["mqar"]["rows"]
                trained = next((x for x in rows if x["seq_len"] == r["seq_len"]), rows[0])
                cells.append(f"{fmt(trained['accuracy'])} (grid {fmt(ev['mqar']['summary']['accuracy'])}); loss "
                             f"{fmt(r['final_loss'])}")
            else:
                cells.append(fmt(r["accuracy"]))
        print(f"| {t} | " + " | ".join(cells) + " |")
    for t in tasks:
        curves = {m: by[(m, t)]["longctx"] for m in models if (m, t) in by and by[(m, t)]["longctx"]}
        if not curves:
            continue
        lengths = [row["length"] for row in next(iter(curves.values()))]
        print(f"\nLong-sequence curve, {t} (accuracy / loss at each evaluation length):\n")
        print("| model | " + " | ".join(str(n) for n in lengths) + " |")
        print("|---|" + "---:|" * len(lengths))
        for m, rows in curves.items():
            print(f"| {m} | " + " | ".join(f"{fmt(x['accuracy'])} / {fmt(x['loss'], 2)}" for x in rows) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
