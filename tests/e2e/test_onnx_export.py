"""``chimera export --format onnx`` run by onnxruntime (``chimera.export.onnx_runtime.OnnxCausalLM``): the prefill
graph's logits and state equal Chimera's ``prefill``, 20 decode steps with the state going round through the decode
graph equal Chimera's ``step`` logits, and the 20-token greedy text is Chimera's, for one preset of each kind of
decoding state (RG-LRU state and conv tail; Mamba's state beside a global KV cache and MoE experts, which the graphs
hold dense; sliding-window ring buffer; Mamba-2's SSM state; Based's linear-attention state and Taylor-feature sums;
Hyena's long-convolution inputs, its FFT a direct convolution in the graph; StripedHyena 2's FIR windows and the
modal filter's complex state as real pairs; Gryphon's S5 state, complex pairs too, and BigBird's block table fixed
at max_len; the routed hybrid, its prompt stepped through the decode graph, its capacity counts in the state and its
SSM state compressed 2x); ``chimera generate --onnx`` prints what ``chimera generate`` prints; the refusals."""

import pytest
import torch

from chimera.export.exporter import export
from chimera.export.onnx import flatten_state
from chimera.export.onnx_runtime import OnnxCausalLM
from chimera.inference.generate import generate
from helpers import preset_run

TOLERANCE = 1e-4  # fp32, max |difference| of logits (and of state tensors)
STEPS = NEW_TOKENS = 20
MAX_LEN = 48

ROUTED = "dynamic-hybrid-tiny:pattern=YE,routed_state_keep=0.5"  # keeps half the SSM state's dims (ratio 2)
# Presets of repeated layers cut to two (their states still go round in order): tracing and the ONNX optimizer take
# time per layer (the whole mamba2-tiny took 68 s, jamba-tiny 60 s); Jamba's Mamba + MoE layer and attention + MLP
# layer keep all its kinds of sublayer.
PRESETS = ["hawk-tiny:num_layers=4", "jamba-tiny:pattern=mE*-", "local-transformer-tiny:num_layers=4",
           "mamba2-tiny:num_layers=2", "based-tiny", "hyena-tiny:num_layers=4", "striped-hyena2-tiny",
           "gryphon-tiny:num_layers=4", ROUTED]
STEPPED_PREFILL = {ROUTED}  # prefill.onnx takes one token, the rest steps through decode


def assert_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.shape == ref.shape, what
    err = (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0  # bool, int64 too
    assert err <= TOLERANCE, f"{what}: max |difference| {err:.2e}"


@pytest.mark.parametrize("preset", PRESETS)
def test_onnx_prefill_and_decode_equal_chimera(tmp_path, preset, single_process):
    model = preset_run(tmp_path / "run", preset)
    out = export(tmp_path / "run", "onnx", tmp_path / "onnx", max_len=MAX_LEN)
    onnx_model = OnnxCausalLM(out)
    assert onnx_model.max_len == MAX_LEN
    assert onnx_model.prefill_max_tokens == (1 if preset in STEPPED_PREFILL else None)  # else one parallel pass
    vocab = min(model.cfg.vocab_size, 257)
    prompt = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        ref_logits, ref_state = model.prefill(prompt, MAX_LEN)
        logits, state = onnx_model.prefill(prompt, MAX_LEN)
        assert_close(logits, ref_logits, "prefill logits")
        for i, (got, ref) in enumerate(zip(state, flatten_state(ref_state), strict=True)):
            assert_close(got, ref, f"prefill state tensor {i}")
        # the state goes round through decode.onnx: its outputs are the next step's inputs
        tokens = torch.randint(0, vocab, (STEPS, 2), generator=torch.Generator().manual_seed(2))
        for step, token in enumerate(tokens):
            pos = prompt.shape[1] + step
            assert_close(onnx_model.step(token, state, pos), model.step(token, ref_state, pos), f"decode step {step}")

    expected = generate(model, prompt[:1, :5], NEW_TOKENS, temperature=0)
    assert torch.equal(generate(onnx_model, prompt[:1, :5], NEW_TOKENS, temperature=0), expected)


def test_generate_onnx_prints_chimeras_text(tmp_path, single_process, run_here):
    preset_run(tmp_path / "run", "hawk-tiny")
    out = export(tmp_path / "run", "onnx", tmp_path / "onnx", max_len=64)
    prompts = ["def ", "import os\n"]  # different lengths: rows at their own positions step in groups
    args = [a for p in prompts for a in ("--prompt", p)] + ["--max-new-tokens", NEW_TOKENS, "--temperature", 0]
    chimera = run_here("generate", tmp_path / "run", *args)
    onnx = run_here("generate", "--onnx", out, *args)
    assert chimera.returncode == 0 and onnx.returncode == 0, chimera.stderr + onnx.stderr
    assert onnx.stdout == chimera.stdout and "--- prompt 2 of 2 ---" in onnx.stdout

    too_long = run_here("generate", "--onnx", out, "--prompt", "def ", "--max-new-tokens", 61)
    assert too_long.returncode == 2 and len(too_long.stderr.strip().splitlines()) == 1
    assert "decoding cache of 64 tokens" in too_long.stderr


def test_onnx_refusals_are_one_line(tmp_path, single_process, run_here):
    preset_run(tmp_path / "glt", "hyena-glt-tiny")
    preset_run(tmp_path / "hawk", "hawk-tiny")
    cases = [
        (["export", tmp_path / "glt", "--format", "onnx", "--out", tmp_path / "x"], "byte-latent model"),
        (["export", tmp_path / "hawk", "--format", "onnx", "--dtype", "bf16", "--out", tmp_path / "x"], "only fp32"),
        (["export", tmp_path / "hawk", "--format", "safetensors", "--max-len", 64, "--out", tmp_path / "x"],
         "--max-len applies to --format onnx"),
        (["generate", "--onnx", tmp_path / "glt", "--prompt", "x"], "has no state.json"),
        (["generate", tmp_path / "glt", "--onnx", tmp_path / "glt", "--prompt", "x"], "one of them"),
    ]
    for args, expected in cases:
        proc = run_here(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and expected in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "x").exists()

