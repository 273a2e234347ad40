"""HF interchange on tiny random transformers models built here (no downloads):
import -> Chimera logits equal HF logits; export -> HF loads it natively with equal logits; greedy
generation identical both ways; bad input is one line with exit code 2."""

import json

import pytest
import torch
import transformers

from helpers import REPO, hf_round_trip, run_chimera, run_chimera_here

TINY = REPO / "configs/runs/tiny.yaml"

torch.manual_seed(0)

TINY_HF = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)),
    "mamba": lambda: transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=320, hidden_size=64, state_size=8, num_hidden_layers=3, expand=2, conv_kernel=4,
        time_step_rank=4, use_bias=False, use_conv_bias=True, tie_word_embeddings=True, layer_norm_epsilon=1e-5)),
    "mamba2": lambda: transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=320, hidden_size=64, state_size=16, num_hidden_layers=3, expand=2, head_dim=16, num_heads=8,
        n_groups=2, conv_kernel=4, chunk_size=16, use_bias=False, use_conv_bias=True, tie_word_embeddings=True,
        layer_norm_epsilon=1e-5)),
    "recurrent_gemma": lambda: transformers.RecurrentGemmaForCausalLM(transformers.RecurrentGemmaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, lru_width=64, attention_window_size=16, conv1d_width=4,
        logits_soft_cap=30.0, rms_norm_eps=1e-6, partial_rotary_factor=0.5,
        block_types=["recurrent", "recurrent", "attention"])),
}


@pytest.mark.parametrize("arch", sorted(TINY_HF))
def test_import_export_round_trip(arch, tmp_path, single_process):
    hf_round_trip(tmp_path, TINY_HF[arch]().eval(), vocab=320)


def llama_with_rope(**rope) -> transformers.LlamaForCausalLM:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=64, **rope))


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
ROPES = {
    "theta-5e4": {"rope_theta": 5e4},
    "theta-5e5": {"rope_theta": 5e5},
    "llama3": {"rope_parameters": {"rope_theta": 5e5, **LLAMA3}},
    "linear": {"rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": 4.0}},
}


@pytest.mark.parametrize("rope", ROPES)
def test_rope_settings_import_and_export_exactly(tmp_path, rope, single_process):
    """transformers 5 keeps RoPE in config.rope_parameters: a base or scaling read from anywhere else would give
    other logits (the round trip compares them at 1e-4, and the export's rope_parameters are HF's own)."""
    torch.manual_seed(0)
    hf = llama_with_rope(**ROPES[rope]).eval()
    plain = llama_with_rope().eval()
    plain.load_state_dict(hf.state_dict())
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(ids).logits - plain(ids).logits).abs().max() > 1e-3  # the setting changes these logits
    hf_round_trip(tmp_path, hf, vocab=320)
    written = json.loads((tmp_path / "exported/config.json").read_text())["rope_parameters"]
    assert written == {k: v for k, v in hf.config.rope_parameters.items()}


def test_recurrent_gemma_reads_its_rope_parameters(tmp_path, single_process):
    torch.manual_seed(0)
    hf = transformers.RecurrentGemmaForCausalLM(transformers.RecurrentGemmaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, lru_width=64, attention_window_size=16, conv1d_width=4,
        rms_norm_eps=1e-6, partial_rotary_factor=0.5, rope_theta=5e4,
        block_types=["attention", "recurrent", "attention"])).eval()
    hf_round_trip(tmp_path, hf, vocab=320)


def test_an_unsupported_rope_type_is_one_line(tmp_path):
    llama_with_rope().save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    (tmp_path / "hf/config.json").write_text(json.dumps(cfg))
    proc = run_chimera_here("import-hf", tmp_path / "hf", "--out", tmp_path / "run")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "RoPE type 'yarn' is not supported" in lines[0]
    assert not (tmp_path / "run").exists()


def test_imported_run_continues_training(tmp_path):
    TINY_HF["llama"]().save_pretrained(tmp_path / "hf")
    assert run_chimera_here("import-hf", tmp_path / "hf", "--out", tmp_path / "run").returncode == 0
    proc = run_chimera("train", tmp_path / "run/run.yaml", "--run-dir", tmp_path / "run", "--set", "train.steps=3",
                       "--set", "train.warmup_steps=1", "--set", "train.micro_batch_size=2",
                       "--set", "train.global_batch_size=2",
                       "--set", "data.seq_len=32", "--set", "logging.wandb=disabled", "--set", "train.eval_every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from the weights of" in proc.stdout
    state = json.loads((tmp_path / "run/checkpoints/step_00000003/trainer_state.json").read_text())
    assert state["step"] == 3


def test_bad_hf_input(tmp_path, run_here):
    def one_line(proc, text):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and text in lines[0], proc.stderr

    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt/config.json").write_text(json.dumps({"model_type": "gpt2"}))
    one_line(run_here("import-hf", tmp_path / "gpt", "--out", tmp_path / "o1"), "unsupported architecture 'gpt2'")
    (tmp_path / "empty").mkdir()
    one_line(run_here("import-hf", tmp_path / "empty", "--out", tmp_path / "o2"), "has no config.json")
    TINY_HF["llama"]().save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    cfg["intermediate_size"] = 200
    (tmp_path / "hf/config.json").write_text(json.dumps(cfg))
    one_line(run_here("import-hf", tmp_path / "hf", "--out", tmp_path / "o3"), "has shape (160, 64)")
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))
    assert not list(tmp_path.glob(".o*"))


def test_export_refuses_what_the_hf_config_cannot_express(tmp_path):
    """A Llama with Granite's residual multiplier is not a Llama: export must not drop the multiplier."""
    TINY_HF["llama"]().save_pretrained(tmp_path / "hf")
    assert run_chimera_here("import-hf", tmp_path / "hf", "--out", tmp_path / "run").returncode == 0
    proc = run_chimera("train", tmp_path / "run/run.yaml", "--run-dir", tmp_path / "run", "--set", "train.steps=1",
                       "--set", "train.warmup_steps=0", "--set", "model.residual_multiplier=0.5",
                       "--set", "train.micro_batch_size=1",
                       "--set", "train.global_batch_size=1", "--set", "data.seq_len=16",
                       "--set", "logging.wandb=disabled", "--set", "train.eval_every=0")
    # a start from imported weights may change a field that keeps every parameter's shape: it is said
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "with model changes: model.residual_multiplier" in proc.stdout + proc.stderr
    proc = run_chimera_here("export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "exported")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "cannot express this model's residual_multiplier" in lines[0]
    assert not (tmp_path / "exported").exists()
