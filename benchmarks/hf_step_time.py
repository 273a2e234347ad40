"""Training step time of Chimera vs HF transformers for the same configs, side by side in one process.

For each architecture and size, a transformers model is built from a config, its weights are
imported into Chimera through the HF mapping (so both compute the same function), and both run
forward + backward + AdamW step on the same random batch. transformers runs its CPU paths (the
torch fallbacks of Mamba, Mamba-2, RecurrentGemma, Jamba and Zamba2; no CUDA kernels here).
Chimera runs the model module directly (no DeepSpeed engine), so the comparison is of the model
implementations.

usage: python benchmarks/hf_step_time.py [--steps N] [--batch B] [--seq S] [--archs a,b]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402

from chimera.configs.schema import ModelConfig  # noqa: E402
from chimera.models.causal_lm import meta_model  # noqa: E402
from chimera.models.hf import ARCHITECTURES, import_state, read_hf_tensors  # noqa: E402
from chimera.parallel.sharding import load_full_state_dict  # noqa: E402

SIZES = {
    "mamba2": {
        "tiny": dict(hidden_size=64, state_size=16, num_hidden_layers=4, expand=2, head_dim=16, num_heads=8,
                     n_groups=1, chunk_size=64),
        "small": dict(hidden_size=256, state_size=64, num_hidden_layers=8, expand=2, head_dim=32, num_heads=16,
                      n_groups=1, chunk_size=64),
    },
    "recurrent_gemma": {
        "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=1, head_dim=16, lru_width=64, attention_window_size=64),
        "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=64, lru_width=256, attention_window_size=128),
    },
    "mamba": {
        "tiny": dict(hidden_size=64, state_size=8, num_hidden_layers=4, expand=2),
        "small": dict(hidden_size=256, state_size=16, num_hidden_layers=8, expand=2),
    },
    "jamba": {  # Mamba-1 with dt/B/C norms, attention every 4th layer, MoE (top-2) every 2nd
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=4,
                     attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8,
                     mamba_dt_rank=4),
        "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, attn_layer_period=4,
                      attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=16),
    },
    "zamba2": {  # Mamba-2 with two shared blocks used in turn, per-use LoRA on the MLP
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                     layers_block_type=["mamba", "mamba", "hybrid"] * 2, n_mamba_heads=8, mamba_d_state=16,
                     num_mem_blocks=2, adapter_rank=8, chunk_size=64),
        "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=12, num_attention_heads=8,
                      layers_block_type=["mamba", "mamba", "hybrid"] * 4, n_mamba_heads=16, mamba_d_state=64,
                      num_mem_blocks=2, adapter_rank=32, chunk_size=64),
    },
}
HF_CLASSES = {
    "mamba2": (transformers.Mamba2Config, transformers.Mamba2ForCausalLM, dict(use_bias=False, use_conv_bias=True)),
    "recurrent_gemma": (transformers.RecurrentGemmaConfig, transformers.RecurrentGemmaForCausalLM,
                        dict(block_types=["recurrent", "recurrent", "attention"])),
    "mamba": (transformers.MambaConfig, transformers.MambaForCausalLM, dict(use_bias=False, use_conv_bias=True)),
    "jamba": (transformers.JambaConfig, transformers.JambaForCausalLM, {}),
    "zamba2": (transformers.Zamba2Config, transformers.Zamba2ForCausalLM, {}),
}


def pair(arch: str, size: str, vocab: int):
    config_cls, model_cls, extra = HF_CLASSES[arch]
    hf = model_cls(config_cls(vocab_size=vocab, tie_word_embeddings=True, **extra, **SIZES[arch][size])).float()
    mapping = ARCHITECTURES[arch]
    cfg = ModelConfig.model_validate(mapping.config_from_hf(hf.config.to_dict()))
    ours = meta_model(cfg)
    with tempfile.TemporaryDirectory() as tmp:  # the names on disk, which the mappings read (experts unfused)
        hf.save_pretrained(tmp)
        state = read_hf_tensors(Path(tmp))
    load_full_state_dict(ours, import_state(mapping, state, cfg, arch))
    return hf, ours


def interleaved_step_times(steps: int, *runs) -> list[float]:
    """Median seconds per step of each run, the runs alternating step by step (A B A B ...), so a change
    in machine load during the measurement hits all of them alike."""
    for run in runs:
        run()  # warm-up
    times = [[] for _ in runs]
    for _ in range(steps):
        for run, bucket in zip(runs, times):
            start = time.perf_counter()
            run()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--archs", default="jamba,zamba2,mamba2,recurrent_gemma,mamba")
    args = parser.parse_args()
    vocab = 320
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    print(f"# {date.today()} | {platform.machine()} | torch {torch.__version__} | transformers "
          f"{transformers.__version__} | threads {torch.get_num_threads()} | batch {args.batch} x seq {args.seq}, "
          f"fp32, forward + backward + AdamW, median of {args.steps} interleaved steps after 1 warm-up")
    print("| architecture | size | transformers ms/step | Chimera ms/step | speed-up (HF / Chimera) |")
    print("|---|---|---:|---:|---:|")
    for arch in args.archs.split(","):
        for size in SIZES[arch]:
            hf, ours = pair(arch, size, vocab)
            hf_opt, our_opt = torch.optim.AdamW(hf.parameters()), torch.optim.AdamW(ours.parameters())

            def hf_step(model=hf, opt=hf_opt):
                opt.zero_grad()
                model(input_ids=ids, labels=ids).loss.backward()  # HF shifts labels internally
                opt.step()

            def our_step(model=ours, opt=our_opt):
                opt.zero_grad()
                model(ids, labels=labels).backward()
                opt.step()

            t_hf, t_ours = interleaved_step_times(args.steps, hf_step, our_step)
            print(f"| {arch} | {size} | {1000 * t_hf:,.0f} | {1000 * t_ours:,.0f} | {t_hf / t_ours:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
