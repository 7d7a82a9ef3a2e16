"""Processed-dataset cache: a dataset built from a file is stored once and loaded in about a second afterwards.

An entry is keyed by the SHA-256 of the input file's bytes (and of the titles file), the preprocessing settings
and the source code of the readers and of `build`, so a changed file, setting or parser never hits an old entry.
Entries live in `$SEQREC_CACHE/datasets` (default `~/.cache/seqrec/datasets`, mode 0700; a directory others can
write into is refused). Each entry is one file: a SHA-256 of the payload, then an `.npz` payload read with
`allow_pickle=False`; a payload that does not match its digest (a torn or corrupted file) is rebuilt. Entries are
written to a temporary file and renamed into place, so readers never see half an entry.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np

from seqrec.errors import SeqrecError
from seqrec.utils.private_dir import cache_root, private_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_DIGEST = hashlib.sha256().digest_size
_CODE = ("readers.py", "columnar.py", "dataset.py", "split.py", "cache.py")  # the code whose output is cached
_CHUNK = 8 << 20


def file_digest(path: str | Path) -> str:
    """SHA-256 of the file's bytes (about 1 GB/s)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def entry_key(files: list, settings: dict) -> str:
    """The cache key of a dataset built from `files` (paths or None) with `settings` (JSON-able)."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _CODE:
        h.update((here / name).read_bytes())
    h.update(json.dumps({"version": FORMAT_VERSION, "settings": settings}, sort_keys=True).encode())
    for f in files:
        h.update(b"none" if f is None else file_digest(f).encode())
    return h.hexdigest()[:32]


def cache_dir() -> Path:
    return private_dir(cache_root() / "datasets")


def load(key: str, cls):
    """(dataset, warnings of its first load) cached under `key`, or None (absent, corrupted or unreadable: it is
    then rebuilt)."""
    try:
        path = cache_dir() / f"{key}.seqdata"
        if not path.is_file():
            return None
        blob = path.read_bytes()
    except (OSError, SeqrecError) as e:
        log.warning("dataset cache not used: %s", e)
        return None
    if hashlib.sha256(memoryview(blob)[_DIGEST:]).digest() != blob[:_DIGEST]:
        log.warning("%s: dataset cache entry is corrupted (digest mismatch); rebuilding it", path)
        return None
    try:
        payload = io.BytesIO(blob)  # shares blob's bytes; np.load reads the .npz after the digest
        payload.seek(_DIGEST)
        with np.load(payload, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        warnings = [str(w) for w in arrays.pop("warnings")]
        return _from_arrays(arrays, cls), warnings
    except (ValueError, KeyError, OSError) as e:
        log.warning("%s: dataset cache entry unreadable (%s); rebuilding it", path, e)
        return None


def store(key: str, data, warnings: list[str]) -> None:
    """Write `data` (a SeqData) and the warnings its load logged under `key`; a failure (full disk, unsafe dir)
    only costs the next run's time."""
    try:
        folder = cache_dir()
        fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(bytes(_DIGEST))  # the payload's digest goes here once it is known
                hashing = _HashingWriter(f)
                np.savez(hashing, warnings=np.array(warnings, dtype=str), **_to_arrays(data))
                f.seek(0)
                f.write(hashing.digest.digest())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / f"{key}.seqdata")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except (OSError, SeqrecError) as e:
        log.warning("dataset cache not written: %s", e)


class _HashingWriter:
    """A write-only stream that hashes what it passes to `file`: the entry is written and hashed in one pass, with
    no copy of it in memory. It has no seek or tell, so zipfile writes the .npz sequentially."""

    def __init__(self, file):
        self._file = file
        self.digest = hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def read(self, size: int = -1) -> bytes:  # np.savez takes an object for a file only if it has read()
        raise io.UnsupportedOperation("write-only stream")


def _to_arrays(data) -> dict:
    """SeqData -> plain arrays; int64 arrays whose values fit int32 are stored as int32 (half the bytes)."""
    out = {"meta": np.array([data.num_users, data.num_items], dtype=np.int64), "name": np.array(data.name)}
    out["split_rule"] = np.array(json.dumps(data.split_rule))  # how targets were held out: plain JSON, no pickle
    for f in fields(data):
        value = getattr(data, f.name)
        if not isinstance(value, np.ndarray):
            continue
        if value.dtype == np.int64 and (value.size == 0 or _fits_int32(value)):
            value = value.astype(np.int32)
        out[f.name] = value
    return out


def _from_arrays(arrays: dict, cls):
    num_users, num_items = (int(x) for x in arrays.pop("meta"))
    name = str(arrays.pop("name"))
    kwargs = {"split_rule": json.loads(str(arrays.pop("split_rule")))} if "split_rule" in arrays else {}
    for f in fields(cls):
        if f.name in ("name", "num_users", "num_items", "_cache", "split_rule"):
            continue
        value = arrays.get(f.name)
        if value is not None and value.dtype == np.int32:
            value = value.astype(np.int64)
        kwargs[f.name] = value
    return cls(name=name, num_users=num_users, num_items=num_items, **kwargs)


def _fits_int32(values: np.ndarray) -> bool:
    return int(values.min()) >= np.iinfo(np.int32).min and int(values.max()) <= np.iinfo(np.int32).max
