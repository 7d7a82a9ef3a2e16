"""Build a C++ source into a shared library once, cache it, and load only a library this user built.

Loading a shared library runs its code, so the cache must not load what someone else put there. The rules:

- The cache directory (`$SEQREC_CACHE/kernels`, default ~/.cache/seqrec/kernels) is created private (0700). If it,
  or the cache root above it, is a symlink, is owned by another user, or is group/world-writable, it is refused with
  one warning and this process builds into a fresh private temporary directory instead.
- Every library is named by the SHA-256 of its own bytes (`<name>-<key>-<digest>.so`), and a small pointer file
  `<name>-<key>.sha256` (key: source, flags, compiler, CPU) records that digest. Before loading, the library's bytes
  are hashed again and compared with the pointer and the file name; an empty, truncated or substituted library, or
  a file owned by another user or writable by others, is not loaded but rebuilt (one warning).
- A build writes a temporary file in the same directory, fsyncs it and renames it into place (atomic), library
  first and pointer last, so a reader never sees a half-written file and parallel workers building at once each
  end with a complete, verified library (identical content gives the identical name).
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "SEQREC_CACHE"
_private_fallback: Path | None = None  # this process's temporary cache after a refused one


class BuildError(RuntimeError):
    """The library could not be built (no compiler, a compiler error) or loaded."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "seqrec")


def compiler() -> str | None:
    """The C++ compiler to use: $CXX, else the first of g++, c++, clang++ on the PATH."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def untrusted_reason(path: Path) -> str | None:
    """Why `path` (file or directory) must not be trusted, or None: a symlink, another owner, group/world-writable."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return "is a symlink"
    if info.st_uid != os.getuid():
        return f"is owned by uid {info.st_uid}, not this user ({os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def kernel_dir() -> Path:
    """The private cache directory, created 0700; a fresh private temporary one if the configured one is unsafe."""
    global _private_fallback
    if _private_fallback is not None:
        return _private_fallback
    root = cache_root()
    directory = root / "kernels"
    try:
        for path in (root, directory):
            path.mkdir(mode=0o700, exist_ok=True, parents=path is root)
            reason = untrusted_reason(path)
            if reason:
                raise PermissionError(f"{path} {reason}")
        return directory
    except OSError as error:
        _private_fallback = Path(tempfile.mkdtemp(prefix="seqrec-kernels-"))  # 0700, ours
        atexit.register(shutil.rmtree, _private_fallback, ignore_errors=True)  # a loaded library stays mapped
        log.warning("kernel cache refused (%s); building in %s for this process instead", error, _private_fallback)
        return _private_fallback


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(tmp: str, final: Path, mode: int) -> None:
    """fsync the finished temporary file, then rename it to `final` (atomic within a directory) and fsync that."""
    _fsync(tmp)
    os.chmod(tmp, mode)
    os.replace(tmp, final)
    _fsync(final.parent)  # the rename itself survives a crash


def _temporary(directory: Path, suffix: str) -> str:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    return tmp


def _verified(directory: Path, stem: str) -> Path | None:
    """The cached library for `stem` if its pointer and its bytes agree and both are this user's; else None."""
    pointer = directory / f"{stem}.sha256"
    if not pointer.exists():
        return None
    try:
        problem = untrusted_reason(pointer)
        digest = pointer.read_text().strip() if problem is None else ""
        library = directory / f"{stem}-{digest[:32]}.so"
        if problem is None and len(digest) == 64 and library.exists():
            problem = untrusted_reason(library) or (None if _sha256(library) == digest else "does not match its digest")
            where = library
        else:
            problem, where = problem or "names no library", pointer
    except OSError as error:
        problem, where = str(error), pointer
    if problem is None:
        return library
    log.warning("kernel cache: %s %s; rebuilding it", where, problem)
    return None


def _build(directory: Path, stem: str, cxx: str, source: Path, flags: list[str]) -> Path:
    """Compile into a temporary file, name it by its digest, then write the pointer; returns the library."""
    tmp = _temporary(directory, ".so")
    try:
        done = subprocess.run([cxx, *flags, str(source), "-o", tmp], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise BuildError(done.stderr.strip()[-600:] or f"{cxx} exited with {done.returncode}")
        digest = _sha256(Path(tmp))
        # named by its digest: concurrent builders of identical bytes write the identical name
        library = directory / f"{stem}-{digest[:32]}.so"
        _install(tmp, library, 0o700)
        tmp = _temporary(directory, ".sha256")
        Path(tmp).write_text(digest + "\n")
        _install(tmp, directory / f"{stem}.sha256", 0o600)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library


def build(name: str, source: Path, flags: list[str]) -> Path:
    """The verified library for `source` and `flags` (this compiler, this CPU), built if the cache has none."""
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found ($CXX, g++, c++, clang++)")
    key = hashlib.sha256(
        b"\0".join([source.read_bytes(), " ".join(flags).encode(), _compiler_version(cxx).encode()])
        + _cpu_signature().encode()
    ).hexdigest()[:16]
    stem = f"{name}-{key}"
    directory = kernel_dir()
    try:
        return _verified(directory, stem) or _build(directory, stem, cxx, source, flags)
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildError(str(error)) from error


def load_library(name: str, source: Path, flags: list[str]) -> ctypes.CDLL:
    """build(), then load the library into this process; raises BuildError."""
    library = build(name, source, flags)
    try:
        return ctypes.CDLL(str(library))
    except OSError as error:
        raise BuildError(str(error)) from error
