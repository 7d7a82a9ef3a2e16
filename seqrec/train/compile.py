"""`trainer.compile=true`: the training step's forward pass and loss through torch.compile, with a private cache.

torch.compile (inductor) writes generated code to a cache directory and later imports it from there: C++ and
Triton sources, compiled libraries, Python wrappers. Its default, /tmp/torchinductor_$USER, is a name anyone on a
shared machine can create first and fill; code in it would run as the user. So the cache goes to a directory only
its owner can write (seqrec.utils.private_dir, like the kernel cache): `$TORCHINDUCTOR_CACHE_DIR` if set (and
private), else `<cache root>/inductor` (`$SEQREC_CACHE`, default ~/.cache/seqrec). A directory that others can
write is refused in one line. Triton's kernels from inductor go to a subdirectory unless TRITON_CACHE_DIR is set,
which must then be private too.

Dropout under compile draws from torch's generator as in eager mode (inductor's `fallback_random`), so a compiled
run samples the same masks as an eager one and differs from it only by the rounding of fused kernels. Shapes: each
new batch shape costs a compilation (after the second, dynamo compiles one graph for dynamic sizes);
`sampler.length_buckets` limits the widths to a few.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from seqrec.utils.private_dir import cache_root, private_dir

log = logging.getLogger(__name__)


def use_private_compile_cache() -> Path:
    """Point inductor's cache at a private directory (created 0700) before anything compiles; returns it.

    Raises:
        UnsafeCacheDir: the directory (or TRITON_CACHE_DIR) is a symlink, another user's, or writable by others.
    """
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    path = private_dir(Path(chosen) if chosen else cache_root() / "inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    if os.environ.get("TRITON_CACHE_DIR"):
        private_dir(Path(os.environ["TRITON_CACHE_DIR"]))
    return path


def compile_step(fn: Callable) -> Callable:
    """torch.compile(fn) with the private cache and eager-mode random numbers."""
    path = use_private_compile_cache()
    torch._inductor.config.fallback_random = True  # dropout masks from torch's generator, as without compile
    log.info("trainer.compile: the forward pass and loss compile on first use (cache %s)", path)
    return torch.compile(fn)
