"""Decode speed and memory vs context length: a recurrent model against a transformer of the same size.

    .venv/bin/python benchmarks/decode_speed.py [--preset hawk-small transformer-small ...]
        [--context 256 512 1024 2048 4096 8192] [--steps 32] [--batch 1]

For each preset and context length L the decoding state is the one ``init_state(batch, L + steps)`` builds, with
every attention slot below L marked as holding a position (keys and values random): a step then reads what it would
read after an L-token prompt (the kernels compute over every slot a row holds, whatever the values). ``steps`` greedy
decoding steps at positions L, L+1, ... are timed after 4 warm-up steps: tokens/s = batch x steps / seconds. Memory:
the decoding state's bytes (``decode_cache.state_bytes``) at that length, and per token of context. Models are built
from their presets' initialisation (speed and state size do not depend on training), fp32, one process.
"""

from __future__ import annotations

import argparse
import time

import torch
from decode_cache import per_token, state_bytes

from chimera.configs.loader import load_model_config
from chimera.models.causal_lm import build_model


def state_at(model, batch: int, context: int, max_len: int) -> list:
    """The decoding state after ``context`` tokens, as far as a step's cost goes (see the module's docstring)."""
    state = model.init_state(batch, max_len)
    g = torch.Generator().manual_seed(0)
    for layer in state:
        if isinstance(layer, dict) and "pos" in layer and "k" in layer:  # an attention cache (ring buffer)
            slots = layer["pos"].shape[-1]
            held = torch.arange(max(0, context - slots), context)
            layer["pos"][:, held % slots] = held
            layer["k"].copy_(torch.randn(layer["k"].shape, generator=g))
            layer["v"].copy_(torch.randn(layer["v"].shape, generator=g))
        elif isinstance(layer, dict):
            for key, value in layer.items():
                if torch.is_tensor(value) and value.is_floating_point():
                    layer[key] = torch.randn(value.shape, generator=g, dtype=value.dtype)
    return state


@torch.inference_mode()
def decode_rate(model, batch: int, context: int, steps: int, warmup: int = 4) -> tuple[float, int]:
    """(tokens/s of greedy decoding at ``context``, the state's bytes)."""
    max_len = context + warmup + steps
    state = state_at(model, batch, context, max_len)
    tokens = torch.zeros(batch, dtype=torch.long)
    pos = context
    for _ in range(warmup):
        tokens = model.step(tokens, state, pos).argmax(-1)
        pos += 1
    start = time.perf_counter()
    for _ in range(steps):
        tokens = model.step(tokens, state, pos).argmax(-1)
        pos += 1
    seconds = time.perf_counter() - start
    return batch * steps / seconds, state_bytes(model, max_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["hawk-small", "transformer-small"])
    parser.add_argument("--context", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    models = {p: build_model(load_model_config(p), seed=0).eval() for p in args.preset}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.steps} steps")
    print(f"{'preset':<24}{'params':>11}{'context':>9}{'tokens/s':>10}{'x first':>9}{'state MB':>10}")
    for preset, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        first = None
        for context in args.context:
            rate, size = decode_rate(model, args.batch, context, args.steps)
            first = first or rate
            print(f"{preset:<24}{params:>11,}{context:>9}{rate:>10.0f}{rate / first:>9.2f}{size / 2**20:>10.2f}",
                  flush=True)
        grow, fixed = per_token(model)
        print(f"{preset:<24}state per row: {grow:,.0f} B more per token of context, {fixed:,} B fixed", flush=True)


if __name__ == "__main__":
    main()
