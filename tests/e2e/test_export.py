"""``chimera export``: the safetensors format read back by ``chimera.load_model`` gives the model's own logits and
greedy text for every test-size preset; shards and their index; the refusals (one line, exit 2) and that nothing
half-written is left; ordinary file permissions; the tokenizer files; ``--step``."""

import json
import os
import stat

import pytest
import torch

import chimera
from chimera.configs.loader import load_model_config
from chimera.errors import UserError
from chimera.export.exporter import export
from chimera.export.safetensors_format import INDEX_FILE, read_shards
from helpers import build_model, preset_run, presets_for_tests, run_chimera, run_chimera_here

try:
    from chimera.inference.generate import generate
except ImportError:  # before the serve helper moves it
    from chimera.trainer.generate import generate

NEW_TOKENS = 20
BF16_TOLERANCE = 0.05  # max |logit difference| / max |logit|: bf16 keeps 8 bits of mantissa (2^-9 relative per weight)


def weights_of(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def prompt_ids(model, length: int = 24, batch: int = 2) -> torch.Tensor:
    vocab = min(model.cfg.vocab_size, 257)
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("preset", presets_for_tests())
def test_safetensors_export_loads_back_with_equal_logits_and_text(tmp_path, preset, single_process):
    model = preset_run(tmp_path / "run", preset)
    out = export(tmp_path / "run", "safetensors", tmp_path / "exported")
    back = chimera.load_model(out)
    ids = prompt_ids(model)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))  # fp32: the same weights, bit for bit
    prompt = ids[:1, :5]
    expected = generate(model, prompt, NEW_TOKENS, temperature=0)
    assert torch.equal(generate(back, prompt, NEW_TOKENS, temperature=0), expected)


@pytest.mark.parametrize("preset", ["llama-tiny", "griffin-tiny"])
def test_bf16_export_is_the_rounded_weights(tmp_path, preset, single_process):
    model = preset_run(tmp_path / "run", preset)
    out = export(tmp_path / "run", "safetensors", tmp_path / "exported", dtype="bf16")
    assert {t.dtype for t in read_shards(out).values()} == {torch.bfloat16}
    back = chimera.load_model(out)
    rounded = build_model(preset).eval()
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    ids = prompt_ids(model)
    with torch.no_grad():
        got, ref = back(ids), model(ids)
        assert torch.equal(got, rounded(ids))  # exactly the bf16-rounded weights, computed in fp32
        assert (got - ref).abs().max() <= BF16_TOLERANCE * ref.abs().max()


def test_shards_and_their_index(tmp_path, single_process):
    model = preset_run(tmp_path / "run", "llama-tiny")
    proc = run_chimera_here("export", tmp_path / "run", "--format", "safetensors", "--out", tmp_path / "exported",
                       "--max-shard-mb", 0.05)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "exported"
    index = json.loads((out / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files == sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert not (out / "model.safetensors").exists()
    from safetensors.torch import load_file

    weights, total = weights_of(model), 0
    for file in files:
        part = load_file(str(out / file))
        assert os.path.getsize(out / file) <= 0.05 * 1024**2 + 4096 or len(part) == 1  # header aside, within the cap
        assert all(index["weight_map"][name] == file for name in part)
        total += sum(t.numel() * t.element_size() for t in part.values())
    assert set(index["weight_map"]) == set(weights) and index["metadata"]["total_size"] == total
    back = chimera.load_model(out)
    ids = prompt_ids(model)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    config = json.loads((out / "chimera_config.json").read_text())
    assert config["model"] == load_model_config("llama-tiny").model_dump(mode="json")


def test_files_get_ordinary_permissions(tmp_path, single_process):
    """safetensors' save_file creates its file 0600 whatever the umask: the exporter sets 0644 / 0755."""
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    assert stat.S_IMODE(os.stat(tmp_path / "plain.safetensors").st_mode) == 0o600  # why the exporter must set them
    preset_run(tmp_path / "run", "llama-tiny")
    for fmt in ("safetensors", "hf"):
        out = export(tmp_path / "run", fmt, tmp_path / fmt, max_shard_mb=0.05)
        assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
        paths = list(out.rglob("*"))
        assert any(p.suffix == ".safetensors" for p in paths)
        for path in paths:
            assert stat.S_IMODE(os.stat(path).st_mode) == (0o755 if path.is_dir() else 0o644), path


def one_line(proc, text: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and text in lines[0], proc.stderr


def test_refusals_are_one_line_and_leave_nothing(tmp_path, single_process, run_here):
    preset_run(tmp_path / "run", "llama-tiny")
    run, out = tmp_path / "run", tmp_path / "out"
    one_line(run_here("export", run, "--format", "tflite", "--out", out), "--format 'tflite': unknown")
    one_line(run_here("export", run, "--format", "safetensors", "--out", out, "--dtype", "int8"),
             "--dtype 'int8': unknown")
    one_line(run_here("export", run, "--format", "safetensors", "--out", out, "--step", 7),
             "has no checkpoint of step 7 (steps: 0)")
    one_line(run_here("export", run, "--format", "safetensors", "--out", out, "--step", -1), "must be >= 0")
    (tmp_path / "empty_run").mkdir()
    one_line(run_here("export", tmp_path / "empty_run", "--format", "safetensors", "--out", out),
             "holds no checkpoint")
    one_line(run_here("export", tmp_path / "nowhere", "--format", "safetensors", "--out", out), "does not exist")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # a format the architecture cannot express: llama.cpp has no Hawk
    preset_run(tmp_path / "hawk", "hawk-tiny")
    one_line(run_here("export", tmp_path / "hawk", "--format", "gguf", "--out", out), "llama.cpp")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    (out / "keep").mkdir(parents=True)
    one_line(run_here("export", run, "--format", "safetensors", "--out", out), "exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["keep"]


def test_a_damaged_checkpoint_is_refused(tmp_path, single_process):
    preset_run(tmp_path / "run", "llama-tiny")
    ckpt = tmp_path / "run/checkpoints/step_00000000"
    victim = max((p for p in (ckpt / "tensors").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:-1] + bytes([victim.read_bytes()[-1] ^ 1]))
    with pytest.raises(UserError, match="does not match its checksum"):
        export(ckpt, "safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failed_write_leaves_nothing_and_overwrite_keeps_the_old_export(tmp_path, single_process, monkeypatch):
    """The disk fills while the second shard is written: no temporary directory stays, the target is as it was
    (absent; or with --overwrite the previous complete export)."""
    import safetensors.torch

    preset_run(tmp_path / "run", "llama-tiny", seed=0)
    real_save, calls = safetensors.torch.save_file, []

    def disk_full_at_second_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_at_second_file)
    with pytest.raises(UserError, match="No space left on device"):
        export(tmp_path / "run", "safetensors", tmp_path / "out", max_shard_mb=0.05)
    assert os.listdir(tmp_path) == ["run"]

    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    first = export(tmp_path / "run", "safetensors", tmp_path / "out", max_shard_mb=0.05)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    preset_run(tmp_path / "run2", "llama-tiny", seed=1)
    calls.clear()
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_at_second_file)
    with pytest.raises(UserError, match="No space left on device"):
        export(tmp_path / "run2", "safetensors", tmp_path / "out", max_shard_mb=0.05, overwrite=True)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["out", "run", "run2"]

    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    with pytest.raises(UserError, match="exists and is not empty"):
        export(tmp_path / "run2", "safetensors", tmp_path / "out")
    export(tmp_path / "run2", "safetensors", tmp_path / "out", overwrite=True)
    assert {p.name: p.read_bytes() for p in first.iterdir()} != before
    assert sorted(os.listdir(tmp_path)) == ["out", "run", "run2"]


# ---- layout-free: a TP=2 checkpoint exports as the same model does at TP=1; --step ----

TRAIN = ["--set", "model.preset=griffin-tiny", "--set", "train.steps=3", "--set", "train.micro_batch_size=2",
         "--set", "train.global_batch_size=2", "--set", "data.seq_len=32", "--set", "checkpoint.every=1",
         "--set", "checkpoint.keep=3", "--set", "train.warmup_steps=1"]


def train_2_ranks(run_dir, layout: str, *fields):
    """3 steps of griffin-tiny on two ranks, ``layout`` a ``parallel`` field (e.g. ``tensor=2``)."""
    from helpers import REPO

    proc = run_chimera("train", REPO / "configs/runs/tiny.yaml", "--run-dir", run_dir, "--nproc", 2, *TRAIN,
                       "--set", f"parallel.{layout}", *fields)
    assert proc.returncode == 0, proc.stderr[-3000:]


def train_tp2(run_dir, *fields):
    train_2_ranks(run_dir, "tensor=2", *fields)


# each layout: the parallel field set, and what the checkpoint's trainer state records of it
LAYOUTS = {"tp2": ("tensor=2", "tensor", 2), "pp2": ("pipeline=2", "pipeline", 2),
           "zero3": ("zero_stage=3", "zero_stage", 3)}  # zero3: two data-parallel ranks
BATCH = {"zero3": ["--set", "train.global_batch_size=4"]}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_of_a_two_rank_checkpoint_equals_the_same_weights_at_one(tmp_path, layout, single_process):
    """3 steps on two ranks at learning rate 1e-30 (every update far below a weight's last bit, so the weights stay
    the initial ones; zero-initialised ones move by ~1e-30): the checkpoint's tensors were written by two ranks as
    TP=2 fragments, as two pipeline stages' layers, or as ZeRO-3 partitions; their export equals the model built in
    one process from the same seed (the init is layout-free), read by no checkpoint code at all."""
    from safetensors.torch import load_file

    field, key, value = LAYOUTS[layout]
    train_2_ranks(tmp_path / layout, field, "--set", "train.lr=1e-30", "--set", "train.min_lr=0",
                  *BATCH.get(layout, []))
    state = json.loads((tmp_path / layout / "checkpoints/step_00000003/trainer_state.json").read_text())
    assert state["layout"][key] == value
    out = export(tmp_path / layout, "safetensors", tmp_path / "out")
    exported = load_file(str(out / "model.safetensors"))
    reference = weights_of(build_model("griffin-tiny", seed=1234))  # train.seed
    assert exported.keys() == reference.keys()
    for name, t in reference.items():
        torch.testing.assert_close(exported[name], t, rtol=0, atol=1e-20, msg=name)


def test_step_picks_an_older_checkpoint(tmp_path, single_process):
    """A TP=2 run trained 3 steps, a checkpoint each step: ``--step 2`` exports step 2 (its own weights, one
    optimizer step before the newest); the default exports step 3."""
    from safetensors.torch import load_file

    from chimera.trainer.checkpoint import read_weights

    train_tp2(tmp_path / "tp2")
    for step in (2, None):
        args = ["--step", step] if step else []
        proc = run_chimera_here("export", tmp_path / "tp2", "--format", "safetensors", "--out", tmp_path / f"s{step}",
                           *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "s2/chimera_config.json").read_text())["step"] == 2
    assert json.loads((tmp_path / "sNone/chimera_config.json").read_text())["step"] == 3
    older, newest = (load_file(str(tmp_path / f"s{s}/model.safetensors")) for s in (2, None))
    step2 = read_weights(tmp_path / "tp2/checkpoints/step_00000002")
    assert all(torch.equal(older[n], step2[n]) for n in step2)
    assert any(not torch.equal(older[n], t) for n, t in newest.items())  # one optimizer step apart


# ---- tokenizers travel with the model ----

def tiny_llama_dir(path, vocab: int = 320):
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False)).save_pretrained(path)
    return path


TEXTS = ["the quick brown fox jumps over the lazy dog " * 20, "hybrid models carry their state " * 20]


def test_import_keeps_the_hf_tokenizer_and_export_carries_it(tmp_path, single_process):
    import transformers
    import yaml

    from chimera.data.tokenizers import get_tokenizer, train_bpe
    from chimera.export.tokenizer_files import read_tokenizer

    hf = tiny_llama_dir(tmp_path / "hf")
    train_bpe(TEXTS, 300, hf / "tokenizer.json")
    proc = run_chimera_here("import-hf", hf, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = yaml.safe_load((tmp_path / "run/run.yaml").read_text())["data"]["tokenizer"]
    assert spec == str((tmp_path / "run/tokenizer.json").resolve())
    assert (tmp_path / "run/tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    ids = get_tokenizer(spec).encode("the lazy fox")
    assert len(ids) < len("the lazy fox")  # merges: not bytes

    for fmt in ("safetensors", "hf"):
        out = tmp_path / f"out-{fmt}"
        proc = run_chimera_here("export", tmp_path / "run", "--format", fmt, "--out", out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
        assert read_tokenizer(out).encode("the lazy fox").tolist() == ids.tolist()
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out-hf")
    assert auto("the lazy fox", add_special_tokens=False)["input_ids"] == ids.tolist()


def test_import_refuses_a_vocabulary_the_model_cannot_hold(tmp_path):
    from chimera.data.tokenizers import train_bpe

    hf = tiny_llama_dir(tmp_path / "hf", vocab=280)
    train_bpe(TEXTS, 300, hf / "tokenizer.json")
    proc = run_chimera_here("import-hf", hf, "--out", tmp_path / "run")
    one_line(proc, "but the model's vocab_size is 280")
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run*"))


def test_byte_runs_name_their_tokenizer(tmp_path, single_process):
    from chimera.export.tokenizer_files import read_tokenizer

    preset_run(tmp_path / "run", "llama-tiny")
    out = export(tmp_path / "run", "safetensors", tmp_path / "out")
    assert json.loads((out / "chimera_tokenizer.json").read_text()) == {
        "tokenizer": "bytes", "name": "bytes", "vocab_size": 257, "eos_id": 256}
    assert not (out / "tokenizer.json").exists()
    assert read_tokenizer(out).decode([104, 105]) == "hi"


# ---- --format hf, native: the presets of the eight architectures transformers has ----

def native_presets() -> list[str]:
    from chimera.models.hf import ARCHITECTURES

    return [p for p in presets_for_tests() if load_model_config(p).family in ARCHITECTURES]


@pytest.mark.parametrize("preset", native_presets())
def test_native_hf_export_gives_equal_logits_and_text(tmp_path, preset, single_process):
    import transformers

    from helpers import hf_greedy

    model = preset_run(tmp_path / "run", preset)
    out = export(tmp_path / "run", "hf", tmp_path / "exported")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = prompt_ids(model)
    with torch.no_grad():
        assert (back(ids).logits - model(ids)).abs().max() <= 1e-4
    prompt = ids[:1, :5]
    assert torch.equal(hf_greedy(back, prompt, NEW_TOKENS), generate(model, prompt, NEW_TOKENS, temperature=0))
