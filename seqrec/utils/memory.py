"""Keep glibc from handing large tensors' memory back to the kernel between training steps.

PyTorch's CPU allocator has no cache: every tensor is malloc'ed and freed. glibc serves blocks above its mmap
threshold (128 KiB at first, raised up to 32 MiB as such blocks are freed) with fresh mmaps, and trims the top of
the heap once more than twice that is free, so each step's activations (MBs each at ML-1M's shape) come back as
new pages that the kernel must fault in and zero on first touch. Pinning the mmap threshold at its 32 MiB maximum
and the trim threshold at 1 GiB lets freed blocks be reused as they are: SASRec's CPU epoch on ML-1M took ~18 %
less time in our benchmark (docs/BENCHMARKS.md). Freed memory then stays with the process instead of returning to
the system, which is what a training loop that allocates the same shapes every step wants anyway.

The price is fragmentation: length-bucketed batches change shape every step, freed blocks in the middle of the
heap cannot be trimmed from its top, and a hidden-256 ML-1M run grew to 8 GB resident, of which `malloc_trim`
handed back ~65 %. `release_free_memory` does that once per epoch, so the reuse within an epoch is kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 2**30

_done = False
_libc = None


def _glibc():
    """glibc's handle, or None where libc is not glibc (musl, macOS, Windows): nothing to tune there."""
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
            _libc = libc
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def reuse_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (once); False where libc is not glibc."""
    global _done
    if _done:
        return True
    libc = _glibc()
    if libc is None:
        return False
    mmap_ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    _done = mmap_ok and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not _done:
        log.debug("mallopt refused the thresholds; keeping glibc's defaults")
    return _done


def release_free_memory() -> bool:
    """Give the heap's free pages back to the system (glibc's malloc_trim(0)); False where there is no glibc."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
