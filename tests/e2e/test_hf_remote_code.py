"""``--format hf`` for any model: the transformers directory with Chimera's own code (``chimera.export.remote_code``),
loaded through ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``, computes Chimera's logits
(the parallel forward, the cached prompt pass and each decoding step) and ``generate()`` gives Chimera's greedy
text, token for token, for every test-size preset (every family, the byte-latent model included)."""

import json

import pytest
import torch
from safetensors import safe_open

import helpers
from chimera.configs.schema import RunConfig, TrainConfig
from chimera.export import remote_code
from chimera.export.source import ExportSource, load_source
from chimera.trainer.checkpoint import write_weights_checkpoint
from helpers import build_model

try:
    from chimera.inference.generate import generate
except ImportError:  # before trainer/generate.py moves to chimera.inference
    from chimera.trainer.generate import generate

transformers = pytest.importorskip("transformers")

BATCH, PROMPT, NEW = 2, 12, 20
TOLERANCE = 1e-4  # fp32
BF16_TOLERANCE = 0.05  # of the logits' largest magnitude: bf16 weights and bf16 arithmetic
EOS = 256  # the byte tokenizer's end of text: generate() stops a row there and pads it


def varied(model):
    """A model with tied embeddings gets its matrices (not the embedding) scaled up: at the tiny init's scale it
    echoes its last token, and greedy text of one repeated token would show little. (Untied models vary as they
    are; scaled, Hyena's products of gates would overflow fp32's precision.)"""
    if not model.cfg.tie_embeddings:
        return model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and not name.startswith("embed"):
                p.mul_(8)
    return model


def source_of(model) -> ExportSource:
    run = RunConfig(model=model.cfg, train=TrainConfig(steps=1000))
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    return ExportSource(checkpoint=None, step=0, run=run, state=state)


def exported(source, out_dir, dtype=torch.float32, **load):
    remote_code.write(source, out_dir, dtype)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True,
                                                                    output_loading_info=True, **load)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return model.eval()


def prompt(seed=0):
    return torch.randint(0, 256, (BATCH, PROMPT), generator=torch.Generator().manual_seed(seed))


def as_hf_generates(tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Chimera's greedy continuation as ``generate()`` returns it: a row that produced the end-of-text token is
    padded (with it) from there on, and generation ends once every row has."""
    out = tokens.clone()
    ends = []
    for row in out:
        hits = (row[prompt_len:] == EOS).nonzero()
        end = prompt_len + int(hits[0]) + 1 if len(hits) else len(row)
        row[end:] = EOS
        ends.append(end)
    return out[:, :max(ends)]


def max_diff(a, b):
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("preset", helpers.presets_for_tests())
def test_remote_code_equals_chimera(preset, tmp_path):
    model = varied(build_model(preset).eval())
    hf = exported(source_of(model), tmp_path)
    ids = prompt()
    with torch.no_grad():
        reference = model(ids)
        parallel = hf(ids, use_cache=False)
        assert parallel.past_key_values is None
        assert max_diff(parallel.logits, reference) <= TOLERANCE

        # the cache: the first half in one pass, then one token per call
        half = PROMPT // 2
        first = hf(ids[:, :half], attention_mask=torch.ones(BATCH, half, dtype=torch.long))
        cache = first.past_key_values
        steps = [hf(ids[:, t:t + 1], past_key_values=cache).logits for t in range(half, PROMPT)]
        assert cache.get_seq_length() == PROMPT
        assert max_diff(torch.cat([first.logits, *steps], 1), reference) <= TOLERANCE

    expected = generate(model, ids, NEW, temperature=0)
    got = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    assert torch.equal(got, as_hf_generates(expected, PROMPT)), (got[:, PROMPT:], expected[:, PROMPT:])


def test_export_of_a_checkpoint(tmp_path):
    """Through a run directory (``load_source``): the files, the config transformers reads, and generate() with its
    defaults (no attention mask, no do_sample) on a recurrent model."""
    model = varied(build_model("griffin-tiny").eval())
    run_dir = write_weights_checkpoint(tmp_path / "run", model.cfg,
                                       {n: p.detach().clone() for n, p in model.named_parameters()}, "test")
    out = tmp_path / "hf"
    out.mkdir()
    hf = exported(load_source(run_dir), out)

    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "configuration_chimera.py",
                                                     "generation_config.json", "model.safetensors",
                                                     "modeling_chimera.py"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "chimera" and config["architectures"] == ["ChimeraForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "configuration_chimera.ChimeraConfig",
                                  "AutoModelForCausalLM": "modeling_chimera.ChimeraForCausalLM"}
    assert config["chimera"] == model.cfg.model_dump(mode="json")
    assert (config["vocab_size"], config["eos_token_id"], config["bos_token_id"]) == (model.cfg.vocab_size, EOS, EOS)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted("model." + n for n, _ in model.named_parameters())
    assert type(hf).__name__ == "ChimeraForCausalLM" and hf.config.model_type == "chimera"

    ids = prompt(1)
    expected = generate(model, ids, NEW, temperature=0)
    assert torch.equal(hf.generate(ids, max_new_tokens=NEW), as_hf_generates(expected, PROMPT))


def test_bf16_export(tmp_path):
    """A bf16 export stores bf16 tensors and loads as a bf16 model (transformers' default dtype: the config's);
    its logits stay within BF16_TOLERANCE of the fp32 model's largest logit."""
    model = build_model("jamba-tiny").eval()
    hf = exported(source_of(model), tmp_path, torch.bfloat16)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    ids = prompt(2)
    with torch.no_grad():
        reference = model(ids)
        for use_cache in (False, True):
            logits = hf(ids, use_cache=use_cache).logits
            assert logits.dtype == torch.bfloat16
            assert max_diff(logits, reference) <= BF16_TOLERANCE * float(reference.abs().max())


def test_loss_of_labels(tmp_path):
    """``labels`` (HF convention: the inputs, shifted inside) give Chimera's next-token loss, with gradients."""
    model = build_model("hawk-tiny").eval()
    hf = exported(source_of(model), tmp_path)
    ids = prompt(3)
    labels = ids.clone()
    labels[0, :4] = -100
    out = hf(ids, labels=labels)
    shifted = labels[:, 1:]
    with torch.no_grad():
        assert abs(float(out.loss) - float(model(ids[:, :-1], labels=shifted))) <= 1e-5
    out.loss.backward()
    assert hf.model.embed.weight.grad is not None and hf.model.embed.weight.grad.abs().sum() > 0


def test_padding_is_refused(tmp_path):
    hf = exported(source_of(build_model("mamba-tiny").eval()), tmp_path)
    ids = prompt()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="attention_mask must be all ones"):
        hf.generate(ids, attention_mask=mask, max_new_tokens=2)
    assert remote_code.refusal(source_of(build_model("mamba-tiny"))) is None
