"""Training step time of Chimera vs HF transformers for the same configs, side by side in one process.

For each architecture and size, a transformers model is built from a config, its weights are
imported into Chimera through the HF mapping (so both compute the same function), and both run
forward + backward + AdamW step on the same random batch, interleaved: ``chimera.launch.bench``
(``hf_pair``, ``compare_hf``), which ``chimera bench --compare-hf`` runs too. transformers runs its CPU
paths (the torch fallbacks of Mamba, Mamba-2, RecurrentGemma, Jamba and Zamba2; no CUDA kernels here).
Chimera runs the model module directly (no DeepSpeed engine), so the comparison is of the model
implementations.

With ``--reference-too`` Chimera runs a second time beside them, the same weights with ``model.kernels=reference``:
the CPU fast paths' own gain, measured in the same rotation (``chimera.models.ops.dispatch``).

usage: python benchmarks/hf_step_time.py [--steps N] [--batch B] [--seq S] [--archs a,b] [--sizes tiny,small]
    [--reference-too]
"""

from __future__ import annotations

import argparse
import platform
import warnings
from datetime import date

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402

from chimera.configs.schema import ModelConfig  # noqa: E402
from chimera.launch.bench import compare_hf, hf_pair  # noqa: E402
from chimera.models.hf import ARCHITECTURES  # noqa: E402

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
    """(the config, (transformers' model, Chimera's with its weights)) of one architecture and size."""
    config_cls, model_cls, extra = HF_CLASSES[arch]
    hf = model_cls(config_cls(vocab_size=vocab, tie_word_embeddings=True, **extra, **SIZES[arch][size]))
    cfg = ModelConfig.model_validate(ARCHITECTURES[arch].config_from_hf(hf.config.to_dict()))
    return cfg, hf_pair(cfg, hf)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--archs", default="jamba,zamba2,mamba2,recurrent_gemma,mamba")
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--reference-too", action="store_true",
                        help="also time Chimera with model.kernels=reference, in the same rotation")
    args = parser.parse_args()
    vocab = 320
    print(f"# {date.today()} | {platform.machine()} | torch {torch.__version__} | transformers "
          f"{transformers.__version__} | threads {torch.get_num_threads()} | batch {args.batch} x seq {args.seq}, "
          f"fp32, forward + backward + AdamW, median of {args.steps} interleaved steps after 1 warm-up")
    extra = " Chimera reference ms/step | fast paths' gain (reference / Chimera) |" if args.reference_too else ""
    print("| architecture | size | transformers ms/step | Chimera ms/step | speed-up (HF / Chimera) |" + extra)
    print("|---|---|---:|---:|---:|" + ("---:|---:|" if args.reference_too else ""))
    for arch in args.archs.split(","):
        for size in args.sizes.split(","):
            cfg, models = pair(arch, size, vocab)
            c = compare_hf(cfg, args.batch, args.seq, args.steps, pair=models, reference_too=args.reference_too)
            extra = (f" {1000 * c.reference_step_s:,.0f} | {c.reference_step_s / c.chimera_step_s:.2f}x |"
                     if args.reference_too else "")
            print(f"| {arch} | {size} | {1000 * c.hf_step_s:,.0f} | {1000 * c.chimera_step_s:,.0f} | "
                  f"{c.speedup:.2f}x |" + extra, flush=True)


if __name__ == "__main__":
    main()
