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
from chimera.trainer.checkpoint import write_weights_checkpoint
from helpers import build_model, run_chimera, test_size_presets

try:
    from chimera.inference.generate import generate
except ImportError:  # before the serve helper moves it
    from chimera.trainer.generate import generate

NEW_TOKENS = 20
BF16_TOLERANCE = 0.05  # max |logit difference| / max |logit|: bf16 keeps 8 bits of mantissa (2^-9 relative per weight)


def weights_of(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def make_run(run_dir, preset: str, seed: int = 0):
    """A run directory whose checkpoint (step 0) holds ``preset``'s model initialised from ``seed``; the model."""
    model = build_model(preset, seed=seed).eval()
    write_weights_checkpoint(run_dir, load_model_config(preset), weights_of(model), source=f"test {preset}")
    return model


def prompt_ids(model, length: int = 24, batch: int = 2) -> torch.Tensor:
    vocab = min(model.cfg.vocab_size, 257)
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("preset", test_size_presets())
def test_safetensors_export_loads_back_with_equal_logits_and_text(tmp_path, preset, single_process):
    model = make_run(tmp_path / "run", preset)
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
    model = make_run(tmp_path / "run", preset)
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
    model = make_run(tmp_path / "run", "llama-tiny")
    proc = run_chimera("export", tmp_path / "run", "--format", "safetensors", "--out", tmp_path / "exported",
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
    make_run(tmp_path / "run", "llama-tiny")
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


def test_refusals_are_one_line_and_leave_nothing(tmp_path, single_process):
    make_run(tmp_path / "run", "llama-tiny")
    run, out = tmp_path / "run", tmp_path / "out"
    one_line(run_chimera("export", run, "--format", "tflite", "--out", out), "--format 'tflite': unknown")
    one_line(run_chimera("export", run, "--format", "safetensors", "--out", out, "--dtype", "int8"),
             "--dtype 'int8': unknown")
    one_line(run_chimera("export", run, "--format", "safetensors", "--out", out, "--step", 7),
             "has no checkpoint of step 7 (steps: 0)")
    one_line(run_chimera("export", run, "--format", "safetensors", "--out", out, "--step", -1), "must be >= 0")
    (tmp_path / "empty_run").mkdir()
    one_line(run_chimera("export", tmp_path / "empty_run", "--format", "safetensors", "--out", out),
             "holds no checkpoint")
    one_line(run_chimera("export", tmp_path / "nowhere", "--format", "safetensors", "--out", out), "does not exist")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # a model transformers has no class for
    make_run(tmp_path / "hawk", "hawk-tiny")
    proc = run_chimera("export", tmp_path / "hawk", "--format", "hf", "--out", out)
    if not importlib_has("chimera.export.remote_code"):
        one_line(proc, "has no native transformers architecture")
        assert not out.exists()
    (out / "keep").mkdir(parents=True)
    one_line(run_chimera("export", run, "--format", "safetensors", "--out", out), "exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["keep"]


def importlib_has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_a_damaged_checkpoint_is_refused(tmp_path, single_process):
    make_run(tmp_path / "run", "llama-tiny")
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

    make_run(tmp_path / "run", "llama-tiny", seed=0)
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
    make_run(tmp_path / "run2", "llama-tiny", seed=1)
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
