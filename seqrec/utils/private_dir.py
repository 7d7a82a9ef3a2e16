"""A per-user cache directory that other users cannot write into (what is loaded from it is trusted)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from seqrec.errors import SeqrecError


class UnsafeCacheDir(SeqrecError):
    """The cache directory is a symlink, belongs to another user or is writable by others."""


def cache_root() -> Path:
    """`$SEQREC_CACHE`, default `~/.cache/seqrec`."""
    return Path(os.environ.get("SEQREC_CACHE", Path.home() / ".cache" / "seqrec"))


def private_dir(path: Path) -> Path:
    """Create `path` (mode 0700) if needed and check that only its owner (this user) can write into it.

    Raises:
        UnsafeCacheDir: a symlink, another owner, or group/other write permission: files in it could have been
            planted by someone else, so nothing is loaded from it.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeCacheDir(f"{path}: cache directory is a symlink or not a directory, expected a private directory")
    if info.st_uid != os.getuid():
        raise UnsafeCacheDir(f"{path}: cache directory belongs to another user, expected one owned by you (mode 0700)")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCacheDir(
            f"{path}: cache directory is writable by other users (mode {stat.S_IMODE(info.st_mode):o}), "
            f"expected mode 0700: chmod 700 {path} or set SEQREC_CACHE"
        )
    return path
