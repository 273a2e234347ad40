"""Training throughput over sequence length: tokens/s of each preset at lengths 512 ... 8192, and its step-time
exponent, beside a transformer baseline in the same run.

Every step trains the same number of tokens (``--tokens``, as ``tokens / L`` sequences of length ``L``) through
the real path (DeepSpeed engine, built-in corpus, fp32, one process). The exponent ``alpha`` is the least-squares
slope of log(time per sequence) against log(L): 1 for a mixer linear in the length, 2 for one quadratic in it
(global attention, once its scores outweigh the projections). Peers run in the same process, so their ratios to
the baseline hold even on a noisy machine.

usage: python benchmarks/sequence_scaling.py [--presets a,b,...] [--lengths 512,1024,...] [--tokens N]
       [--steps N] [--warmup N]
"""

from __future__ import annotations

import argparse
import platform
import warnings
from datetime import date

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from train_throughput import DEMO, seconds_per_step  # noqa: E402  (benchmarks/, the script's folder)

from chimera.configs.loader import load_run_config  # noqa: E402
from chimera.launch.bench import fit_exponent  # noqa: E402


def step_time(preset: str, seq_len: int, tokens: int, steps: int, warmup: int) -> float:
    """Seconds per training step of ``tokens`` tokens in sequences of ``seq_len``."""
    batch = max(1, tokens // seq_len)
    cfg = load_run_config(DEMO, [f"model.preset={preset}", "logging.wandb=disabled", f"data.seq_len={seq_len}",
                                 f"train.micro_batch_size={batch}", f"train.global_batch_size={batch}",
                                 "train.eval_every=0"])
    return seconds_per_step(cfg, steps, warmup)[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="transformer-small,griffin-small")
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    presets, lengths = args.presets.split(","), [int(n) for n in args.lengths.split(",")]
    times = {p: {n: step_time(p, n, args.tokens, args.steps, args.warmup) for n in lengths} for p in presets}
    base = presets[0]
    print(f"# {date.today()} | {platform.processor() or platform.machine()} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | {args.tokens} tokens per step, fp32, 1 process, ZeRO-0")
    print("| preset | " + " | ".join(f"tok/s @{n}" for n in lengths) + f" | alpha | tok/s @{lengths[-1]} vs {base} |")
    print("|---|" + "---:|" * (len(lengths) + 2))
    for p in presets:
        tps = [args.tokens // n * n / times[p][n] for n in lengths]
        alpha = fit_exponent(lengths, [times[p][n] / max(1, args.tokens // n) for n in lengths])
        ratio = times[base][lengths[-1]] / times[p][lengths[-1]]
        print(f"| {p} | " + " | ".join(f"{t:,.0f}" for t in tps) + f" | {alpha:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
