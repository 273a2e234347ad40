"""The one place where megatron-core is made to run on CPU.

megatron-core's tensor/sequence-parallel mappings allocate buffers with
``device=torch.cuda.current_device()``. Without CUDA that call raises; pointing it at the CPU is
all those code paths need (measured: TP and SP mappings over gloo then run unchanged). Nothing is
patched when CUDA is available.
"""

import torch

_applied = False


def enable_cpu_fallback() -> None:
    global _applied
    if _applied or torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: "cpu"  # buffers land on the CPU
    _applied = True
