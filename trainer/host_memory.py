"""Host memory that a rank frees goes back to the operating system.

A rank's host memory comes and goes in large blocks: building a model shard by shard and handing it to DeepSpeed
(ZeRO's partitioning, flattening, fp32 master copies) frees as much as it keeps, and every step gathers
parameters and allocates gradients that it frees again. glibc's allocator serves blocks under its mmap threshold
(which it raises as it goes, up to 32 MiB) from its heap and keeps them there when freed, so the resident memory
of a rank grows by what it ever had alive at once, plus fragments, and the next large allocation (AdamW's moments
at the first step) comes on top. Measured with llama-1b at ZeRO-3 bf16 over 2 ranks on a 24 GiB machine
(benchmarks/RESULTS.md): 7.3 GiB resident per rank after the build while holding 4.6 GiB, and the first step ran
out of memory; with the two calls below the run fits (9.2 GiB per rank at its peak).

* ``map_large_blocks_apart``: blocks of 4 MiB and more get a mapping of their own (a fixed ``M_MMAP_THRESHOLD``),
  returned to the system as soon as they are freed;
* ``release_free_host_memory``: return the heap's free pages (``malloc_trim``; tensors are freed when their last
  reference goes, so no garbage collection is needed first, which costs ~0.2 s with DeepSpeed loaded).

With another C library both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
LARGE_BLOCK = 4 << 20


@cache
def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def map_large_blocks_apart(threshold: int = LARGE_BLOCK) -> None:
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


def release_free_host_memory() -> None:
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
