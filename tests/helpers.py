"""Test helpers: model builders and running the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_model(preset: str, seed: int = 0, overrides=(), dims=None):
    """A preset's model for ``dims`` (default: one process, no process group), initialised from ``seed``."""
    from chimera.configs.loader import load_model_config
    from chimera.models import causal_lm
    from chimera.parallel.dims import ParallelDims

    return causal_lm.build_model(load_model_config(preset, list(overrides)), dims or ParallelDims(), seed=seed)



def preset_spec(spec: str) -> tuple[str, list[str]]:
    """``"name"`` or ``"name:field=value,field=value"`` -> ``(name, overrides)``."""
    preset, _, overrides = spec.partition(":")
    return preset, [o for o in overrides.split(",") if o]


def preset_run(run_dir, spec: str, seed: int = 0):
    """A run directory whose checkpoint (step 0) holds the model of ``spec`` (``preset_spec``) initialised from
    ``seed``; the model (eval mode)."""
    from chimera.configs.loader import load_model_config
    from chimera.trainer.checkpoint import write_weights_checkpoint

    preset, overrides = preset_spec(spec)
    model = build_model(preset, seed=seed, overrides=overrides).eval()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    write_weights_checkpoint(run_dir, load_model_config(preset, overrides), weights, source=f"test {spec}")
    return model

TEST_SIZE = 1_000_000  # parameters: below this a preset is one of ours for tests (published names keep published sizes)


def presets_for_tests() -> list[str]:
    """The presets built for tests (``*-tiny``, ``granite-tiny``; ``*-small`` are benchmark sizes), told apart by
    size, not by name: a published model's name may end in ``-tiny`` too (IBM's granite-4.0-h-tiny has 7 B)."""
    from chimera.configs.loader import load_model_config, preset_names

    return [p for p in preset_names() if meta_model(load_model_config(p)).num_parameters() < TEST_SIZE]


def meta_model(cfg):
    from chimera.models.causal_lm import meta_model as build_meta

    return build_meta(cfg)


def run_chimera(*args, cwd=None, timeout=900, env=None) -> subprocess.CompletedProcess:
    """Run the ``chimera`` CLI as a user would; returns the completed process (text output)."""
    full_env = dict(os.environ, WANDB_MODE="offline", **(env or {}))
    full_env.pop("RANK", None)
    full_env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "chimera.launch.cli", *map(str, args)], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def run_chimera_here(*args) -> subprocess.CompletedProcess:
    """``run_chimera`` in this process, without a new interpreter's seconds of importing torch: for commands that
    refuse bad input before any work or process starts, and for single-process ones that leave no global state behind
    (``checkpoint``, ``generate``, ``export``, ``import-hf``), not for a run that trains or starts ranks.
    ``chimera.launch.cli.main``'s return (or its argument parser's ``SystemExit``) is the exit code; its output is
    captured; the environment and directory it sees are ``run_chimera``'s, and restored after."""
    import contextlib
    import io

    import pytest

    from chimera.launch import cli

    with pytest.MonkeyPatch.context() as env:
        for name in ("RANK", "WORLD_SIZE"):
            env.delenv(name, raising=False)
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.chdir(REPO)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([str(a) for a in args])
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def read_metrics(run_dir) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def hf_greedy(model, prompt, n: int):
    """transformers' greedy generation of exactly ``n`` tokens (no stop at an end-of-sequence token)."""
    model.generation_config.eos_token_id = None
    out = model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, : prompt.shape[1] + n]


def hf_round_trip(tmp_path, hf_model, vocab: int):
    """A transformers model through ``chimera import-hf`` and ``chimera export --format hf`` and back:

    * the imported model's logits equal HF's (max abs diff <= 1e-4) and its 20-token greedy generation
      is identical;
    * the export holds exactly the tensor names of HF's own ``save_pretrained``, loads as the same class
      through ``AutoModelForCausalLM``, with equal logits and generation.

    Returns what tests check further: ``ours``, ``back`` (the reloaded export), ``ref`` (HF's logits) and
    ``on_disk`` (HF's saved tensors)."""
    from types import SimpleNamespace

    import torch
    import transformers
    from safetensors.torch import load_file

    import chimera
    from chimera.inference.generate import generate

    hf_model.save_pretrained(tmp_path / "hf")
    on_disk = load_file(str(tmp_path / "hf/model.safetensors"))
    proc = run_chimera_here("import-hf", tmp_path / "hf", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = chimera.load_model(tmp_path / "run")
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf_model(ids).logits, ours(ids)
    assert (got - ref).abs().max() <= 1e-4
    prompt = ids[:1, :5]
    expected = hf_greedy(hf_model, prompt, 20)
    assert expected.shape == (1, 25)
    assert torch.equal(generate(ours, prompt, 20, temperature=0), expected)

    proc = run_chimera_here("export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "exported")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(load_file(str(tmp_path / "exported/model.safetensors"))) == set(on_disk)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert type(back) is type(hf_model)
    with torch.no_grad():
        assert (back(ids).logits - got).abs().max() <= 1e-4
    assert torch.equal(hf_greedy(back, prompt, 20), expected)
    return SimpleNamespace(ours=ours, back=back, ref=ref, on_disk=on_disk)


def run_configs(specs, base: list[str]):
    """``(name, RunConfig)`` of each ``NAME=PRESET[;FIELD=VALUE...]`` spec: configs/runs/tiny.yaml with the ``base``
    fields, the preset, then the spec's fields (``;``-separated: values may hold commas)."""
    from chimera.configs.loader import load_run_config

    for spec in specs:
        name, _, rest = spec.partition("=")
        preset, *fields = rest.split(";")
        yield name, load_run_config(REPO / "configs/runs/tiny.yaml", [*base, f"model.preset={preset}", *fields])


def run_worker(out: Path, worker: str, nproc: int, *args) -> dict:
    """Run ``tests/distributed/<worker>`` on ``nproc`` local ranks with ``args``; it saves its results (on rank 0)
    to ``out``, which is returned loaded."""
    import torch

    from chimera.launch.local import launch

    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    command = [sys.executable, str(REPO / "tests/distributed" / worker), *map(str, args)]
    assert launch(nproc, command) == 0, f"{worker} on {nproc} ranks failed"
    return torch.load(out)


def run_tp_layout(tmp_path, preset: str, tp: int, sequence_parallel: bool) -> dict:
    """Logits, loss and full gradients of ``preset`` computed by ``tests/distributed/tp_worker.py`` on ``tp`` ranks."""
    out = tmp_path / f"{preset}-tp{tp}.pt"
    if not out.exists():
        run_worker(out, "tp_worker.py", tp, tp, out, preset)
    import torch

    return torch.load(out)[preset, sequence_parallel]


def assert_same_numbers(got: dict, ref: dict) -> None:
    """fp32, same weights: layouts differ only in summation order."""
    import torch

    torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
    assert got["grads"].keys() == ref["grads"].keys()
    for name in ref["grads"]:
        torch.testing.assert_close(got["grads"][name], ref["grads"][name], rtol=1e-4, atol=1e-6, msg=name)


def assert_causal(mixer, x, t: int = 23) -> tuple:
    """Changing token ``t`` of ``x [s, b, d]`` changes no output before ``t`` and does change output ``t``.

    Returns the two outputs for further checks."""
    import torch

    x2 = x.clone()
    x2[t] += torch.randn_like(x2[t])
    y, y2 = mixer(x), mixer(x2)
    torch.testing.assert_close(y[:t], y2[:t], rtol=0, atol=0)
    assert (y[t] - y2[t]).abs().max() > 1e-6
    return y, y2


# ---- the test-size presets trained at TP=2 and sampled through the CLI (tests/e2e/test_*presets_train.py) ----

PROMPT, NEW_TOKENS = "def ", 12
TP2_TRAINING = ["parallel.tensor=2", "train.steps=30", "train.lr=0.005", "train.warmup_steps=5",
                "train.micro_batch_size=8", "train.global_batch_size=8"]


def greedy_by_full_forward(model, prompt: bytes, n: int) -> list[int]:
    import torch

    seq = torch.tensor([list(prompt)])
    for _ in range(n):
        nxt = model(seq)[:, -1, :257].argmax(-1)  # the byte tokenizer's 257 ids; the rest is vocabulary padding
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq[0].tolist()


ZOO_ONE = {"granite-tiny", "griffin-tiny", "hawk-tiny", "hybrid-moe-tiny", "jamba-tiny", "llama-tiny",
            "local-transformer-tiny", "mamba-tiny", "mamba2-tiny", "recurrentgemma-tiny", "transformer-tiny",
            "zamba-tiny", "zamba2-tiny"}


def train_with_tensor_parallelism(root: Path, presets: list[str]) -> Path:
    """Each preset trained on the built-in corpus at TP=2 for 30 steps in ``root/<preset>``, as `chimera train
    configs/runs/tiny.yaml --nproc 2 --set model.preset=<preset> --set ...` would: the runs go one after another
    through the trainer in one process group of two ranks (``tests/distributed/train_worker.py``), which spares each
    its own launcher and two interpreters. Returns ``root``."""
    specs = [f"{preset}={';'.join([preset, *TP2_TRAINING])}" for preset in presets]
    run_worker(root / "results.pt", "train_worker.py", 2, root / "results.pt", root, *specs)
    return root


def trained_with_tensor_parallelism_and_generates(run_dir: Path, preset: str, run_here) -> None:
    """The run of ``preset`` in ``run_dir`` (``train_with_tensor_parallelism``): its loss fell, and `chimera
    generate` from it in this process (``run_here``, the conftest fixture) gives greedy text equal to the argmax of
    full forward passes."""
    import chimera

    rows = read_metrics(run_dir)
    losses = [r["loss"] for r in rows]
    assert len(losses) == 30, (preset, len(losses))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (preset, first, last)
    if "moe" in preset:  # per-layer router statistics reach the metrics
        loads = [v for k, v in rows[-1].items() if k.endswith("/expert_load")]
        assert loads and all(abs(sum(load) - 1) < 1e-3 for load in loads)
        assert all(k in rows[-1] for k in ("moe/layers.3/aux_loss", "moe/layers.3/z_loss"))

    sampled = run_here("generate", run_dir, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS, "--temperature", 0)
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    from chimera.data.tokenizers import ByteTokenizer

    expected = greedy_by_full_forward(chimera.load_model(run_dir), PROMPT.encode(), NEW_TOKENS)
    assert sampled.stdout.rstrip("\n") == ByteTokenizer().decode(expected).rstrip("\n"), preset


# An architecture benchmark of two runs (Griffin, Hawk matched to it) on MQAR: `chimera bench-arch` locally and as a
# Slurm job array.
TINY_EXPERIMENT = """
name: tiny
models:
  - name: griffin
    preset: griffin-tiny
    d_model: 32
    overrides: {num_layers: 3, mlp_hidden: 64, num_heads: 2, window: 8}
  - {name: hawk, preset: hawk-tiny, match: griffin, overrides: {num_layers: 2, num_heads: 2}}
tasks:
  - name: mqar
    task: mqar
    options: {vocab_size: 128, num_kv_pairs: 2}
    seq_len: 16
    eval:
      mqar: {seq_lens: [16, 32], kv_pairs: [2, 4], samples: 8}
      longctx: {lengths: [16, 32, 64], samples: 4}
budget: {tokens: 192, full_tokens: 1920}
train: {micro_batch_size: 4, global_batch_size: 4, warmup_steps: 1}
"""


def grads(out, inputs, seed: int = 0):
    """The gradients of ``out`` for ``inputs`` under one random output gradient (``seed``), as a tuple."""
    import torch

    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


def assert_close_all(got, want, **tol) -> None:
    """``torch.testing.assert_close`` of each pair, naming the position of the first that differs."""
    import torch

    for i, (x, y) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(x, y, **tol, msg=lambda m, i=i: f"output {i}: {m}")
