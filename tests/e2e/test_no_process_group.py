"""Inspection and interchange need no process group: `chimera models`, `chimera import-hf`, `chimera export` and
`chimera.load_model` (forward and decoding) run in one fresh process that never initialises torch.distributed
(nor imports megatron-core), and give the numbers transformers gives."""

import subprocess
import sys
import textwrap

from helpers import REPO

SCRIPT = textwrap.dedent('''
    import contextlib, io, sys
    import torch
    import torch.distributed as dist
    import transformers
    import chimera
    from chimera.launch.cli import main
    from chimera.inference.generate import generate

    out, hf_dir = sys.argv[1], sys.argv[2]
    listing = io.StringIO()
    with contextlib.redirect_stdout(listing):
        assert main(["models"]) == 0
    assert "zamba2-2.7b" in listing.getvalue() and "2,662,214,560" in listing.getvalue()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False)).eval()
    hf.save_pretrained(hf_dir)
    assert main(["import-hf", hf_dir, "--out", out + "/run"]) == 0
    assert main(["export", out + "/run", "--format", "hf", "--out", out + "/exported"]) == 0
    ours = chimera.load_model(out + "/run")
    back = transformers.AutoModelForCausalLM.from_pretrained(out + "/exported").eval()
    ids = torch.randint(1, 320, (2, 16), generator=torch.Generator().manual_seed(0))  # no 0: HF's pad id
    with torch.no_grad():
        ref = hf(ids).logits
        assert (ours(ids) - ref).abs().max() <= 1e-4 and (back(ids).logits - ref).abs().max() <= 1e-4
    hf.generation_config.eos_token_id = None  # exactly 8 new tokens
    greedy = hf.generate(ids[:1, :4], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(ours, ids[:1, :4], 8, temperature=0), greedy)
    print("initialized", dist.is_initialized(), "megatron", any(m.startswith("megatron") for m in sys.modules))
''')


def test_models_import_export_and_inference_without_a_process_group(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(tmp_path / "hf")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "initialized False megatron False"
