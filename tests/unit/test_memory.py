"""seqrec.utils.memory: after reuse_freed_memory(), a freed 10 MiB block's pages are reused by the next malloc of
that size instead of being returned to the kernel and faulted in again (glibc only)."""

import ctypes
import platform
import resource

import pytest

from seqrec.utils.memory import reuse_freed_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")


def faults_per_round(nbytes: int, rounds: int = 6) -> float:
    """Minor page faults per malloc-fill-free round (after one warm-up round)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def one_round():
        block = libc.malloc(nbytes)
        ctypes.memset(block, 1, nbytes)  # touch every page, as a kernel writing an activation does
        libc.free(block)

    one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        one_round()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds


def test_a_freed_block_is_reused_not_faulted_in_again():
    assert reuse_freed_memory() and reuse_freed_memory()  # idempotent
    nbytes = 20 * 2**20  # above glibc's default dynamic ceiling for a first block, below the pinned 32 MiB
    assert faults_per_round(nbytes) < 50  # 5,120 pages if each round got fresh memory
