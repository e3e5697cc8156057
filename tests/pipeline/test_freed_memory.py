"""parallel.malloc_mmap_threshold: a training worker's large freed host blocks go back to the system (glibc's mmap
threshold fixed, as MALLOC_MMAP_THRESHOLD_ sets it), where glibc's dynamic threshold keeps them in the heap after a
larger block was freed, which is how ZeRO-3's gathers and releases behave. Measured on a real process's RSS."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.config import ConfigError, ParallelConfig, validate_parallel
from pipeline.config.model import ModelConfig

PROBE = """
import ctypes, sys
import psutil
from pipeline.train.distributed import limit_freed_memory
set_ = limit_freed_memory(int(sys.argv[1]))
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
big = libc.malloc(8 << 20)
ctypes.memset(big, 1, 8 << 20)
libc.free(big)  # glibc's dynamic threshold rises to 8 MiB here
blocks = [libc.malloc(2 << 20) for _ in range(128)]
for b in blocks:
    ctypes.memset(b, 1, 2 << 20)
pin = libc.malloc(256 << 10)  # above them in the heap (too large for a freed small chunk): the heap stays
ctypes.memset(pin, 1, 64)
before = psutil.Process().memory_info().rss
for b in blocks:
    libc.free(b)
print(set_, (before - psutil.Process().memory_info().rss) / 2**20)
"""


def freed_mib(threshold: int) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(threshold)], capture_output=True, text=True, timeout=60,
                         check=True).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_freed_blocks_go_back_to_the_system_with_the_threshold_set():
    was_set, returned = freed_mib(131072)
    assert was_set and returned > 200  # the 256 MiB freed leaves the process
    was_set, returned = freed_mib(0)  # glibc's dynamic threshold: they stay in the heap
    assert not was_set and returned < 50, returned


def test_the_threshold_is_checked():
    with pytest.raises(ConfigError, match="parallel.malloc_mmap_threshold=-1"):
        validate_parallel(ParallelConfig(malloc_mmap_threshold=-1), ModelConfig())
