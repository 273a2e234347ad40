"""torch's CPU ``exp`` by where its argument lies: the time of ``torch.exp(x, out=y)`` over 2 M float32
elements (Mamba-2 small's ``[b, g, h, c, q, q]`` decay matrix) all equal to one value, the median of 15 runs, and its
ratio to the time at 0. A result below the smallest normal float (1.2e-38, an argument below about -87.3), an
underflow to 0, ``-inf`` and an overflow each take a slower path, which is why ``chimera.models.ops.ssd_cpu`` keeps
the decay's exponent in [EXP_FLOOR, 0] and sets the decays below ``NEGLIGIBLE_DECAY`` to 0. Then: the decay matrix of
random log decays as the SSD on CPU builds it and as the reference does (``-inf`` above the diagonal, then exp), the
same input both times; and what a denormal operand costs a batched matmul and a multiply.

    .venv/bin/python benchmarks/cpu_exp.py
"""

from __future__ import annotations

import platform
from datetime import date

import torch
import torch.nn.functional as F
from cpu_scan import median_ms  # beside this script

from chimera.models.ops.ssd_cpu import EXP_FLOOR, NEGLIGIBLE_DECAY

SHAPE = (8, 1, 16, 4, 64, 64)
ARGUMENTS = [0.0, -50.0, -87.0, -88.0, -90.0, -100.0, -110.0, -float("inf"), 50.0, 90.0]


def main() -> None:
    print(f"# {date.today()} | {platform.machine()} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()} | {torch.Size(SHAPE).numel():,} float32 elements")
    print("| argument | exp(argument) | ms | x the time at 0 |")
    print("|---:|---:|---:|---:|")
    out = torch.empty(SHAPE)
    at_zero = None
    for value in ARGUMENTS:
        x = torch.full(SHAPE, value)
        ms = median_ms(lambda x=x: torch.exp(x, out=out), runs=15)
        at_zero = at_zero or ms
        print(f"| {value:g} | {out.flatten()[0].item():.3g} | {ms:.2f} | {ms / at_zero:.1f}x |")
    # the decay matrix exp(cum_l - cum_s) of log decays in [-4, 0] per position: 0 to -250 below the diagonal
    cum = (-4 * torch.rand(*SHAPE[:-1], generator=torch.Generator().manual_seed(0))).cumsum(-1)
    later = torch.ones(SHAPE[-1], SHAPE[-1], dtype=torch.bool).triu(1)
    diff = cum.unsqueeze(-1) - cum.unsqueeze(-2)

    def as_on_cpu():
        decay = diff.clone().clamp_(EXP_FLOOR, 0.0).exp_()
        return F.threshold_(decay, NEGLIGIBLE_DECAY, 0.0).mul_(~later)

    clamped = median_ms(as_on_cpu, runs=15)
    reference = median_ms(lambda: diff.clone().masked_fill_(later, -float("inf")).exp_(), runs=15)
    print(f"| decay matrix as the CPU path builds it ([{EXP_FLOOR:g}, 0], exp, below {NEGLIGIBLE_DECAY:.1e} set to 0, "
          f"masked by a multiply) | | {clamped:.2f} | |")
    print(f"| decay matrix, -inf above the diagonal then exp | | {reference:.2f} | {reference / clamped:.1f}x the "
          "CPU path's |")
    # what a denormal operand costs the next steps (M = (C B^T) * decay, then M @ xdt)
    M, xdt = torch.rand(512, 64, 64), torch.rand(512, 64, 32)
    tiny = M * 1e-39  # all denormal
    for name, fn in (("batched matmul [512, 64, 64] @ [512, 64, 32]", lambda m: m @ xdt),
                     ("multiply of [512, 64, 64] by 2", lambda m: m * 2.0)):
        normal_ms, denormal_ms = (median_ms(lambda fn=fn, m=m: fn(m), runs=15) for m in (M, tiny))
        print(f"| {name}, denormal operand against normal | | {denormal_ms:.2f} against {normal_ms:.2f} | "
              f"{denormal_ms / normal_ms:.1f}x |")


if __name__ == "__main__":
    main()
