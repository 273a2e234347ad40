"""MFU and `chimera bench` through the command line: the logged and printed figures agree with the FLOP model, the
peak and each other (consistency, not timing), and bad input exits 2."""

from __future__ import annotations

import json
import math

import pytest

from chimera.configs.loader import load_model_config, load_run_config
from chimera.models.flops import model_flops_per_token
from helpers import REPO, read_metrics, run_chimera

TINY = REPO / "configs/runs/tiny.yaml"


def cached_peak(cache_home) -> float:
    [value] = json.loads((cache_home / "chimera/peak.json").read_text()).values()
    return value


def test_logged_mfu_is_flops_per_token_times_tokens_over_step_time_and_peak(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    proc = run_chimera("train", TINY, "--run-dir", run_dir, "--set", "train.steps=3",
                       env={"XDG_CACHE_HOME": str(cache), "CHIMERA_PEAK_TFLOPS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_run_config(TINY)
    peak = cached_peak(cache)  # measured by the run, once, on this machine
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        per_token = model_flops_per_token(cfg.model, r["seq_len"])
        assert r["tflops"] == pytest.approx(per_token * r["tokens_per_s"] / 1e12, rel=1e-9)  # one process
        assert r["mfu"] == pytest.approx(per_token * r["tokens_per_s"] / peak, rel=1e-9)
    basis = json.loads((run_dir / "mfu_basis.json").read_text())
    assert basis["peak_tflops"] == pytest.approx(peak / 1e12) and basis["devices"] == 1
    assert basis["model_flops_per_token"] == pytest.approx(model_flops_per_token(cfg.model, 64))
    assert "% MFU" in proc.stdout


def parse_table(text: str, header: str) -> list[list[str]]:
    lines = text[text.index(header):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%x"))


def test_bench_prints_consistent_throughput_scaling_and_the_hf_comparison(tmp_path):
    cache = tmp_path / "cache"
    proc = run_chimera("bench", "mamba2-tiny", "--seq-lens", "32,64", "--tokens", "256", "--steps", "2",
                       "--warmup", "1", "--compare-hf", "--json", tmp_path / "bench.json",
                       env={"XDG_CACHE_HOME": str(cache), "CHIMERA_PEAK_TFLOPS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    peak = cached_peak(cache)
    assert f"peak: {peak / 1e12:.3g} TFLOP/s" in out
    cfg = load_model_config("mamba2-tiny")
    rows = parse_table(out, "| layout | seq len |")
    assert [(r[0], int(r[1]), int(r[2])) for r in rows] == [("1", 32, 8), ("1", 64, 4)]
    saved = json.loads((tmp_path / "bench.json").read_text())
    for (_, seq, sequences, step_ms, tokens_s, tflops, mfu, memory), point in zip(rows, saved["points"], strict=True):
        seq, sequences = int(seq), int(sequences)
        assert number(tokens_s) == pytest.approx(sequences * seq / (number(step_ms) / 1e3), rel=2e-3, abs=1)
        assert number(tokens_s) == pytest.approx(point["tokens_per_s"], abs=0.5)
        # against the unrounded tokens/s: the printed one is a whole number, 0.5% off at ~100 tokens/s
        assert number(tflops) == pytest.approx(model_flops_per_token(cfg, seq) * point["tokens_per_s"] / 1e12,
                                               rel=2e-3)
        assert number(mfu) == pytest.approx(100 * number(tflops) * 1e12 / peak, rel=2e-3, abs=0.01)
        assert number(memory) > 0
    [(_, per_seq_32, per_seq_64, alpha)] = parse_table(out, "| layout | ms/seq")
    assert number(alpha) == pytest.approx(math.log(number(per_seq_64) / number(per_seq_32)) / math.log(2), abs=0.02)
    [(seq, batch, hf_ms, ours_ms, speedup)] = parse_table(out, "| seq len | batch |")[:1]
    assert number(speedup) == pytest.approx(number(hf_ms) / number(ours_ms), rel=0.02)
    assert [p["seq_len"] for p in saved["points"]] == [32, 64] and len(saved["compare_hf"]) == 2
    assert saved["exponents"]["1"] == pytest.approx(number(alpha), abs=1e-3)


@pytest.mark.parametrize("args, says", [
    (["hawk-tiny", "--seq-lens", "0,64"], "--seq-lens"),
    (["hawk-tiny", "--layouts", "tp0"], "--layouts"),
    (["hawk-tiny", "--steps", "0"], "--steps"),
    (["no-such-config.yaml"], "neither a run file nor a model preset"),
    (["hawk-tiny", "--compare-hf"], "no transformers counterpart"),
    (["hawk-tiny", "--layouts", "tp3"], "parallel.tensor=3"),
])
def test_bench_bad_input_exits_2(args, says):
    proc = run_chimera("bench", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert says in proc.stderr and "Traceback" not in proc.stderr
