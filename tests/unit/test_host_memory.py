"""glibc's allocator as ``chimera.trainer.host_memory`` sets it, read back through ``mallinfo2`` (the bytes it holds in
blocks mapped apart) in a fresh interpreter, whose allocator this test may change: blocks of 4 MiB and more are mapped
apart during the build; after a first step with room, a large block comes from the heap and stays there when
freed; without room (the node's memory, as the check reads it, too small) nothing changes; the next build maps them
apart again."""

import subprocess
import sys

import pytest

from helpers import REPO

PROBE = """
import ctypes, ctypes.util, sys
import torch
from chimera.trainer import host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2

def mapped_apart_by(nbytes):
    before = libc.mallinfo2().hblkhd
    block = torch.empty(nbytes // 4)
    return libc.mallinfo2().hblkhd - before

host_memory.map_large_blocks_apart()
print(mapped_apart_by(64 << 20) >= 64 << 20)
if sys.argv[1] == "no room":
    host_memory.node_memory_bytes = lambda: 1 << 20
kept = host_memory.keep_freed_blocks_if_room(2)
print(kept, mapped_apart_by(64 << 20) >= 64 << 20)
host_memory.map_large_blocks_apart()  # the next build (another trainer in this process) maps them apart again
print(mapped_apart_by(64 << 20) >= 64 << 20)
"""


@pytest.mark.parametrize("room,expected", [("room", ["True", "True False", "True"]),
                                           ("no room", ["True", "False True", "True"])])
def test_freed_blocks_are_kept_only_where_there_is_room(room, expected):
    if sys.platform != "linux":
        pytest.skip("glibc's allocator: Linux only")
    proc = subprocess.run([sys.executable, "-c", PROBE, room], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:3] == expected


def test_node_memory_is_at_most_the_machines():
    import os

    from chimera.trainer.host_memory import node_memory_bytes

    assert 0 < node_memory_bytes() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
