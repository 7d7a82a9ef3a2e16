"""Checkpoint files a run can trust: written atomically with their SHA-256 beside them, read without running code.

Writing: the bytes go to `<name>.tmp`, are fsynced and renamed over `<name>`, so a reader sees the whole old file
or the whole new one; a write that fails (disk full, quota, Ctrl-C) removes its `.tmp` files and leaves the
previous checkpoint as it was.

Digest: `save_checkpoint` hashes the bytes as torch writes them and records the SHA-256 in a sidecar
`<name>.sha256` in `sha256sum` format; `load_checkpoint` checks it before a byte is unpickled. A sidecar rather
than a digest inside the file because (1) the check needs nothing from the file it checks, so a damaged file is
reported as damaged instead of failing somewhere inside torch, (2) `cd checkpoints && sha256sum -c best.pt.sha256`
verifies it without seqrec, and (3) the .pt stays an ordinary torch file, hashed while it is written (no second
copy of the weights in memory). The two renames are not one atomic step: the new digest is fsynced to
`<name>.sha256.tmp` before the checkpoint is renamed, so a process killed between the renames leaves a pending
digest that matches the new file, and `load_checkpoint` completes the rename; a Ctrl-C there finishes it at once
(the clean-up of a stopped save deletes the pending digest only while the checkpoint is not yet renamed).
Checkpoints from before digests were recorded load with a warning.

Reading: `torch.load(weights_only=True)` rebuilds tensors and plain data only; a file whose pickle asks for any
other object (the way a crafted .pt runs code on loading) is refused with one line, before that object is
imported. `save_checkpoint` checks that what it writes is that kind of data, so every checkpoint seqrec writes loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import torch

from seqrec.errors import CheckpointError

log = logging.getLogger(__name__)

DIGEST_SUFFIX = ".sha256"
# what a checkpoint may hold: leaves torch's weights-only unpickler rebuilds, inside dicts, lists and tuples; exact
# types, as subclasses are pickled by their own class (numpy.float64 is a float, and is refused)
PLAIN_LEAVES = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device)
PLAIN_MAPPINGS = (dict, OrderedDict)
PLAIN_SEQUENCES = (list, tuple, torch.Size)


# --------------------------------------------------------------------------------------------- writing
class _HashingWriter:
    """A write-only file wrapper that hashes what passes through it (torch.save only calls write and flush)."""

    def __init__(self, file):
        self.file, self.sha256 = file, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _write_synced(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _sync_directory(folder: Path) -> None:
    """Make the renames in `folder` durable (a power cut after os.replace could otherwise undo them)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible everywhere (e.g. some network file systems); the renames still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def atomic_write_bytes(path: Path, write) -> None:
    """Call `write(file_object)` on a temporary sibling, then rename it over `path` (never a half file).

    On any failure the temporary file is removed and the exception propagates; `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        _write_synced(tmp, write)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _sync_directory(path.parent)


def digest_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + DIGEST_SUFFIX)


def check_plain(node, where: str = "state") -> None:
    """Raise TypeError naming the first value in `node` that `torch.load(weights_only=True)` would refuse.

    A bug guard: Trainer.state_dict stores tensors and plain data, and this keeps it so at the moment of writing
    (an unloadable checkpoint would otherwise surface only at the next resume)."""
    if type(node) in PLAIN_MAPPINGS:
        for key, value in node.items():
            if type(key) not in PLAIN_LEAVES:
                raise TypeError(f"checkpoint {where} has a key of type {type(key).__name__}: {key!r}")
            check_plain(value, f"{where}[{key!r}]")
    elif type(node) in PLAIN_SEQUENCES:
        for i, value in enumerate(node):
            check_plain(value, f"{where}[{i}]")
    elif not (isinstance(node, torch.Tensor) or type(node) in PLAIN_LEAVES):
        raise TypeError(
            f"checkpoint {where} is a {type(node).__module__}.{type(node).__qualname__}; checkpoints hold only "
            "tensors, numbers, strings, lists and dicts (convert it before saving)"
        )


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, read-only folder): the run can resume once that is fixed."""


def save_checkpoint(state: dict, path: Path) -> None:
    """Write `state` atomically to `path` and its SHA-256 to `<path>.sha256`; CheckpointError if the disk refuses."""
    check_plain(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, digest = path.with_name(path.name + ".tmp"), digest_path(path)
    digest_tmp = digest.with_name(digest.name + ".tmp")
    try:
        writer = {}

        def write_state(f):
            writer["hash"] = _HashingWriter(f)
            torch.save(state, writer["hash"])

        _write_synced(tmp, write_state)
        line = f"{writer['hash'].sha256.hexdigest()}  {path.name}\n"
        _write_synced(digest_tmp, lambda f: f.write(line.encode()))  # pending before the checkpoint changes
        os.replace(tmp, path)
        os.replace(digest_tmp, digest)
    except OSError as e:
        _abandon_save(tmp, digest_tmp, digest)
        raise CheckpointWriteError(
            f"{path}: cannot write the checkpoint ({(e.strerror or str(e)).lower()}); the previous one is kept; free "
            "space or fix the folder's permissions"
        ) from None
    except BaseException:  # Ctrl-C can land between the two renames
        _abandon_save(tmp, digest_tmp, digest)
        raise
    _sync_directory(path.parent)


def _abandon_save(tmp: Path, digest_tmp: Path, digest: Path) -> None:
    """Clean up a save that stopped part-way. Before the checkpoint's rename (its .tmp still there) both .tmp files
    go and the previous checkpoint stays with its digest; after it, the pending digest is the only record of the new
    file's SHA-256, so it is moved into place rather than deleted (or left pending for `load_checkpoint`)."""
    if tmp.exists():
        _remove_quietly(tmp, digest_tmp)
        return
    try:
        os.replace(digest_tmp, digest)
    except OSError:
        pass


def write_json(obj: dict, path: Path) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


# --------------------------------------------------------------------------------------------- reading
def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _read_digest(sidecar: Path) -> str | None:
    """The hex digest recorded in a `sha256sum`-format file, None if there is no such file."""
    if not sidecar.is_file():
        return None
    try:
        text = sidecar.read_text(errors="replace")
    except OSError as e:
        raise CheckpointError(f"{sidecar}: cannot read the recorded digest ({e.strerror})") from None
    first = text.split(maxsplit=1)[0].lower() if text.strip() else ""
    if not re.fullmatch(r"[0-9a-f]{64}", first):
        raise CheckpointError(f"{sidecar}: expected a SHA-256 line as `sha256sum` writes it, got {text[:80]!r}")
    return first


def _completes_an_interrupted_save(path: Path, actual: str) -> bool:
    """True if a save was killed between its two renames: the pending digest matches the new file. Then finish it."""
    pending = digest_path(path).with_name(digest_path(path).name + ".tmp")  # as save_checkpoint names it
    try:
        if _read_digest(pending) != actual:
            return False
    except CheckpointError:  # a half-written pending digest: the save did not get as far as renaming the file
        return False
    try:
        os.replace(pending, digest_path(path))
    except OSError:  # a read-only copy of the run: the digest matched, which is all loading needs
        pass
    return True


def verify_digest(path: Path) -> bool:
    """Check `path` against its recorded SHA-256; False if none is recorded (older runs), CheckpointError if it
    differs."""
    sidecar = digest_path(path)
    recorded = _read_digest(sidecar)
    if recorded is None:
        return False
    actual = file_sha256(path)
    # the last test: another process (a DDP rank loading the same file) completed the interrupted save meanwhile
    if actual != recorded and not _completes_an_interrupted_save(path, actual) and _read_digest(sidecar) != actual:
        raise CheckpointError(
            f"{path}: checksum mismatch: the file changed after it was written (SHA-256 {actual[:12]}..., "
            f"{sidecar.name} records {recorded[:12]}...); it is damaged or was replaced; delete it, or "
            "point trainer.resume / --checkpoint at another checkpoint"
        )
    return True


def _refused_object(error: Exception) -> str | None:
    """The object a weights-only unpickling refused (e.g. 'builtins.exec'), or None if it failed for another
    reason (a truncated or damaged file)."""
    text = str(error)
    if "Weights only load failed" not in text:
        return None
    named = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported (?:operand|class) ([^\s.]+)", text)
    return named.group(1) if named else "an object that is not a tensor or plain data"


def _unpickle_weights_only(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/corrupt zips and pickles
        refused = _refused_object(e) if isinstance(e, pickle.UnpicklingError) else None
        if refused is not None:
            raise CheckpointError(
                f"{path}: refused to load: it asks for {refused}, which is not a tensor or plain data (unpickling "
                "it could run code); seqrec checkpoints hold only tensors, numbers, strings, lists and dicts"
            ) from None
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "it is corrupt or truncated; delete it or point trainer.resume at another checkpoint"
        ) from None


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by `save_checkpoint`, or raise CheckpointError (one line naming the file) if it is
    missing, differs from its recorded digest, holds anything but tensors and plain data, or is no seqrec
    checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    verified = verify_digest(path)
    state = _unpickle_weights_only(path)
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise CheckpointError(f"{path}: not a seqrec checkpoint (expected a dict with 'model' and 'epoch')")
    if not verified:  # said only for a file that loaded: a refused one gets its one line and nothing else
        log.warning(
            "%s: no %s file beside it (written before seqrec recorded digests); loaded unverified", path, DIGEST_SUFFIX
        )
    return state
