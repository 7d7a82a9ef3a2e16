"""Files a run directory hands back are data, never code: a crafted checkpoint (its pickle runs code when loaded
unrestricted) is refused in one line at resume, at test and by `seqrec.predict`, and its code never runs; a
checkpoint with a flipped byte is a one-line checksum mismatch, not a silent load."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

import seqrec.predict
from seqrec.errors import CheckpointError
from seqrec.run import run
from seqrec.train.checkpoint import digest_path
from tests.conftest import TINY, compose_config
from tests.unit.test_checkpoint import WritesAMarker


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trust") / "run"
    run(compose_config(TINY, folder))
    return folder


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


# what happens to the digest the run recorded: left as it was, rewritten to match (as whoever crafted the file could),
# or removed (as for a checkpoint from before digests); the expected one-line error for each
DIGESTS = {"kept": "checksum mismatch", "matching": "refused to load", "removed": "refused to load"}


def plant_crafted(path: Path, marker: Path, digest: str) -> None:
    """Replace the checkpoint at `path` by a crafted one that runs code when unpickled unrestricted."""
    torch.save({"model": WritesAMarker(marker), "epoch": 1}, path)
    if digest == "matching":
        digest_path(path).write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    elif digest == "removed":
        digest_path(path).unlink()


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def resume(run_dir: Path):
    return run(compose_config(TINY + ["trainer.resume=auto"], run_dir))


def assert_one_line(error: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message and all(p in message for p in parts), message


@pytest.mark.parametrize("digest", DIGESTS)
@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_a_crafted_checkpoint_is_refused_at_resume_and_at_test(run_dir, tmp_path, name, digest):
    """last.pt is read when the run resumes; best.pt when it tests. The copied run has finished training; without
    its results.json (a run stopped before its test) a relaunch goes straight to testing."""
    marker = tmp_path / "marker"
    crafted = run_dir / "checkpoints" / name
    if name == "best.pt":
        (run_dir / "results.json").unlink()
    plant_crafted(crafted, marker, digest)
    with pytest.raises(CheckpointError) as error:
        resume(run_dir)
    assert_one_line(error, str(crafted), DIGESTS[digest])
    assert not marker.exists()


@pytest.mark.parametrize("digest", DIGESTS)
def test_a_crafted_checkpoint_is_refused_by_predict(run_dir, tmp_path, capsys, digest):
    marker = tmp_path / "marker"
    plant_crafted(run_dir / "checkpoints" / "best.pt", marker, digest)
    assert seqrec.predict.main([str(run_dir), "--out", "-"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "best.pt" in err and DIGESTS[digest] in err
    assert not marker.exists()


def test_a_flipped_byte_in_a_real_checkpoint_is_caught_at_resume_and_by_predict(run_dir, capsys):
    flip_a_byte(run_dir / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError) as error:
        resume(run_dir)
    assert_one_line(error, str(run_dir / "checkpoints" / "last.pt"), "checksum mismatch: the file changed after")
    flip_a_byte(run_dir / "checkpoints" / "best.pt")
    assert seqrec.predict.main([str(run_dir), "--out", "-"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "best.pt: checksum mismatch: the file changed after it was written" in err


def test_an_untouched_run_resumes_and_predicts(run_dir, capsys):
    assert resume(run_dir)["epochs_run"] == 2  # the digests written during training verify
    assert seqrec.predict.main([str(run_dir), "--users", "0", "--k", "2", "--out", "-"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 2
