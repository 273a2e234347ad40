"""GoldFinch's decoding cache against a transformer of the same size: bytes per token of the decoding state.

    .venv/bin/python benchmarks/decode_cache.py [--preset goldfinch-1.5b ...] [--dtype bf16]

For each preset the model is built on the meta device (no weights) and its decoding state (``init_state``) sized at
two lengths; the difference over the extra positions is the cache's bytes per token (fixed-size recurrent states,
the Finch layers' token shifts and WKV matrices, do not grow and are printed apart). The transformer has the same
width and depth: one global-attention block (multi-head, ``d_model / rwkv_head_size`` heads, keys and values of
every head cached) and one gated MLP per GoldFinch block, i.e. ``2 x blocks x d_model`` numbers per token.
"""

from __future__ import annotations

import argparse

import torch

from chimera.configs.loader import load_model_config
from chimera.models.causal_lm import meta_model
from chimera.models.config import ModelConfig

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def state_bytes(model, length: int) -> int:
    total = 0
    for layer in model.init_state(1, length):
        leaves = layer.values() if isinstance(layer, dict) else ([] if layer is None else [layer])
        total += sum(t.numel() * t.element_size() for t in leaves if torch.is_tensor(t))
    return total


def per_token(model, short: int = 1024, long: int = 2048) -> tuple[float, int]:
    """(bytes per token of the growing cache, bytes that do not grow)."""
    a, b = state_bytes(model, short), state_bytes(model, long)
    grow = (b - a) / (long - short)
    return grow, int(a - grow * short)


def transformer_like(cfg) -> ModelConfig:
    blocks = len(cfg.layers) // 2
    heads = cfg.d_model // cfg.effective("rwkv_head_size")
    return ModelConfig(pattern="*-", num_layers=2 * blocks, vocab_size=cfg.vocab_size, d_model=cfg.d_model,
                       num_heads=heads, num_kv_heads=heads, mlp_hidden=cfg.effective("rwkv_ffn_hidden"),
                       tie_embeddings=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["goldfinch-tiny", "goldfinch-small", "goldfinch-1.5b"])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    print(f"{'preset':<18}{'params':>15}{'cache B/token':>15}{'fixed state B':>15}"
          f"{'transformer B/token':>21}{'ratio':>9}")
    for preset in args.preset:
        cfg = load_model_config(preset)
        model = meta_model(cfg).to(dtype)
        grow, fixed = per_token(model)
        reference = meta_model(transformer_like(cfg)).to(dtype)
        ref_grow, _ = per_token(reference)
        print(f"{preset:<18}{model.num_parameters():>15,}{grow:>15,.0f}{fixed:>15,}{ref_grow:>21,.0f}"
              f"{ref_grow / grow:>9.0f}x")


if __name__ == "__main__":
    main()
