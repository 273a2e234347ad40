"""``chimera eval``, ``chimera bench-arch`` and ``chimera plot`` as a user runs them: results against references
(ln V for zero weights, the shipped JSON schema through jsonschema, PNGs decoded by matplotlib), and bad input
refused in one line with exit code 2."""

import copy
import json
import math

import jsonschema
import numpy as np
import pytest
import torch

from tests.helpers import TINY_EXPERIMENT, build_model, run_chimera


def _one_line_exit_2(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chimera: error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _zero_run(tmp_path):
    from chimera.configs.loader import load_model_config
    from chimera.trainer.checkpoint import write_weights_checkpoint

    model = build_model("griffin-tiny")
    weights = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    return write_weights_checkpoint(tmp_path / "zero", load_model_config("griffin-tiny"), weights, "test")


def test_eval_ppl_on_known_weights_equals_ln_vocab(tmp_path):
    run = _zero_run(tmp_path)
    out = tmp_path / "ppl.json"
    proc = run_chimera("eval", run, "--suite", "ppl", "--set", "seq_len=32", "--set", "max_tokens=320",
                       "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "perplexity" in proc.stdout and "bits_per_byte" in proc.stdout  # the table
    result = json.loads(out.read_text())
    assert result["rows"][0]["tokens"] == 320
    assert abs(result["summary"]["loss"] - math.log(320)) < 1e-6

    (tmp_path / "doc.txt").write_text("a prepared dataset for the ppl suite\n" * 30)  # 1,110 bytes
    prepared = run_chimera("data", "prepare", tmp_path / "doc.txt", "--tokenizer", "bytes", "--format", "webdataset",
                           "--out", tmp_path / "wds", "--quiet")
    assert prepared.returncode == 0, prepared.stderr
    proc = run_chimera("eval", run, "--suite", "ppl", "--set", f"data={tmp_path / 'wds'}", "--set", "seq_len=64",
                       "--out", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["summary"]["tokens"] == (1110 + 1 - 1) // 64 * 64  # the document and its separator, in windows
    assert abs(result["summary"]["loss"] - math.log(320)) < 1e-6



def _rows_close(got, ref, path="result"):
    """Equal structure and strings; numbers equal to 1e-9 (relative): the ranks add the same sums in another order."""
    if isinstance(ref, dict):
        assert got.keys() == ref.keys(), path
        for k in ref:
            _rows_close(got[k], ref[k], f"{path}.{k}")
    elif isinstance(ref, list):
        assert len(got) == len(ref), path
        for i, (g, r) in enumerate(zip(got, ref)):
            _rows_close(g, r, f"{path}[{i}]")
    elif isinstance(ref, float) and not math.isnan(ref):
        assert math.isclose(got, ref, rel_tol=1e-9, abs_tol=1e-12), (path, got, ref)
    else:
        assert got == ref or (isinstance(ref, float) and math.isnan(got)), (path, got, ref)


@pytest.mark.parametrize("suite, options", [
    ("ppl", ["seq_len=32", "max_tokens=1600"]),  # 50 windows: 4 batches of 16 rows, split 2 / 2 over the ranks
    ("chomsky", ["tasks=[parity_check, reverse_string]", "num_lengths=3", "samples=40"]),
])
def test_eval_on_two_ranks_equals_one(tmp_path, suite, options):
    """A randomly initialised model (its predictions far from uniform): the result of ``--nproc 2`` (each rank
    every other batch, the sums added over gloo) equals the one-process result."""
    from helpers import preset_run

    preset_run(tmp_path / "run", "griffin-tiny", seed=3)
    sets = [x for o in options for x in ("--set", o)]
    outs = {n: tmp_path / f"{n}.json" for n in (1, 2)}
    for n, out in outs.items():
        proc = run_chimera("eval", tmp_path / "run", "--suite", suite, *sets, "--nproc", n, "--out", out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("chimera: wrote") == 1  # rank 0 alone reports
    one, two = (json.loads(outs[n].read_text()) for n in (1, 2))
    _rows_close(two, one)
    if suite == "ppl":
        assert one["summary"]["tokens"] == 1600

def test_bad_input_is_one_line_exit_2(tmp_path, run_here):
    run = _zero_run(tmp_path)
    _one_line_exit_2(run_here("eval", run, "--suite", "hellaswag"), "invalid choice: 'hellaswag'")
    (tmp_path / "empty").mkdir()
    _one_line_exit_2(run_here("eval", tmp_path / "empty", "--suite", "mqar"), "holds no checkpoint")
    _one_line_exit_2(run_here("eval", run, "--suite", "mqar", "--set", "vocab_size=1024"),
                     "vocabulary holds 320")
    _one_line_exit_2(run_here("eval", run, "--suite", "mqar", "--set", "sample=3"), "sample", "unknown field")
    bad_preset = tmp_path / "bad_preset.yaml"
    bad_preset.write_text(TINY_EXPERIMENT.replace("preset: hawk-tiny", "preset: hawk-huge"))
    _one_line_exit_2(run_here("bench-arch", bad_preset, "--out", tmp_path / "o1"),
                     "unknown model preset 'hawk-huge'")
    small_vocab = tmp_path / "small_vocab.yaml"
    small_vocab.write_text(TINY_EXPERIMENT + "vocab_size: 64\n")
    _one_line_exit_2(run_here("bench-arch", small_vocab, "--out", tmp_path / "o2"),
                     "task mqar needs 128 token ids", "cannot hold")
    _one_line_exit_2(run_here("bench-arch", bad_preset, "--out", tmp_path / "o3", "--slurm", "--dry-run"),
                     "unknown model preset 'hawk-huge'")  # checked before anything is submitted
    _one_line_exit_2(run_here("bench-arch", small_vocab, "--partition", "debug"), "--partition", "add --slurm")
    _one_line_exit_2(run_here("bench-arch", small_vocab, "--slurm", "--gpus-per-node", "2", "--dry-run"),
                     "--gpus-per-node 2", "one process")
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))  # nothing half-written


def _assert_png_with_content(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    flat = pixels.reshape(-1, pixels.shape[-1])
    assert len(np.unique(flat, axis=0)) > 20  # not one colour: axes, text and lines were drawn


def test_bench_arch_tiny_experiment_results_validate_and_plot(tmp_path):
    from chimera.evaluation.bench import SCHEMA

    exp = tmp_path / "tiny.yaml"
    exp.write_text(TINY_EXPERIMENT)
    out = tmp_path / "out"
    proc = run_chimera("bench-arch", exp, "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(results, schema)  # the independent validator
    runs = {r["model"]: r for r in results["runs"]}
    assert set(runs) == {"griffin", "hawk"} and all(r["steps"] == 3 for r in runs.values())
    g, h = runs["griffin"]["parameters"], runs["hawk"]["parameters"]
    assert abs(g - h) / g <= 0.02  # matched
    assert [row["length"] for row in runs["hawk"]["longctx"]] == [16, 32, 64]
    logged = (out / "runs/hawk/mqar/lr0.003-seed0/metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in logged]
    assert runs["hawk"]["loss_curve"] == [[r["step"], r["loss"]] for r in metrics]
    for name in ("accuracy_vs_length", "accuracy_vs_d_model", "loss_curves", "throughput_memory"):
        _assert_png_with_content(out / "plots" / f"{name}.png")

    for broken in (lambda r: r["runs"][0].pop("parameters"), lambda r: r["runs"][1].update(accuracy=1.5),
                   lambda r: r.update(budget="tiny"), lambda r: r["runs"][0]["loss_curve"].append(["x", 1.0])):
        bad = copy.deepcopy(results)
        broken(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)

    again = run_chimera("bench-arch", exp, "--out", out)  # finished runs are skipped
    assert again.returncode == 0 and again.stdout.count("done before, skipped") == 2

    fig = tmp_path / "curves.png"
    proc = run_chimera("plot", out / "runs/griffin/mqar/lr0.003-seed0", out / "runs/hawk/mqar/lr0.003-seed0",
                       "--out", fig)
    assert proc.returncode == 0, proc.stderr
    _assert_png_with_content(fig)
    _one_line_exit_2(run_chimera("plot", tmp_path, "--out", tmp_path / "x.png"), "no metrics.jsonl")
