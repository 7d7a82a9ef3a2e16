"""seqrec.utils.memory: after reuse_freed_memory(), a freed 10 MiB block's pages are reused by the next malloc of
that size instead of being returned to the kernel and faulted in again; release_free_memory() hands free pages in
the middle of the heap back (glibc only)."""

import ctypes
import platform
import resource

import pytest

from seqrec.utils.memory import release_free_memory, reuse_freed_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _libc():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def faults_per_round(nbytes: int, rounds: int = 6) -> float:
    """Minor page faults per malloc-fill-free round (after one warm-up round)."""
    libc = _libc()

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


def test_free_blocks_between_live_ones_are_handed_back():
    assert reuse_freed_memory()
    libc, nbytes = _libc(), 8 * 2**20
    blocks = [libc.malloc(nbytes) for _ in range(24)]  # 192 MiB on the heap (below the pinned mmap threshold)
    for b in blocks:
        ctypes.memset(b, 1, nbytes)
    for b in blocks[::2]:  # free every other block: holes that the heap's top trim cannot reach
        libc.free(b)
    before = resident_bytes()
    assert release_free_memory()
    handed_back = before - resident_bytes()
    for b in blocks[1::2]:
        libc.free(b)
    assert handed_back > 0.8 * 12 * nbytes  # the 12 freed blocks' pages, give or take their chunk headers
