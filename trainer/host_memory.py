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
  reference goes, so no garbage collection is needed first, which costs ~0.2 s with DeepSpeed loaded);
* ``keep_freed_blocks_if_room``: where the node's ranks at their peak so far (the build and a first step) use under
  half its memory, every block from then on comes from the heap and stays there when freed (``M_MMAP_MAX = 0``, no
  trimming), for the next step to reuse. On a CPU a step's activations are such blocks; mapped apart, each one is
  faulted in page by page again at every step, and those faults, not the arithmetic, were most of an elementwise
  op's time: ``chimera bench hyena-small`` 1.75x faster at 1k and 1.79x at 16k tokens a sequence, for 25% more peak
  memory (benchmarks/RESULTS.md). The llama-1b run above peaks at 77% of the machine and keeps mapping blocks apart.

With another C library they do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
from functools import cache

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt's parameter numbers (malloc.h)
DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD = 65536, 128 << 10  # glibc's
NEVER_TRIM = 1 << 62
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
    """Blocks of ``threshold`` bytes and more mapped apart (and mapping allowed again, freed heap memory trimmed again
    at glibc's default, where ``keep_freed_blocks_if_room`` had stopped both in this process)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


def release_free_host_memory() -> None:
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def node_memory_bytes() -> int:
    """The memory this process may use on its node: the machine's, or its control group's limit where lower (a
    container's, a Slurm job's ``--mem``)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(limit).read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def keep_freed_blocks_if_room(ranks_on_node: int) -> bool:
    """From now on serve every block from the heap and keep freed ones there, where ``ranks_on_node`` processes at
    this one's peak resident memory so far use under half of ``node_memory_bytes``; whether it did."""
    libc = _glibc()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    if libc is None or 2 * ranks_on_node * peak > node_memory_bytes():
        return False
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
    return True
