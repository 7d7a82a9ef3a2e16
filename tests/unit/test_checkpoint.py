"""Checkpoint files: a SHA-256 beside each, verified on load; weights-only unpickling; atomic writes that leave no
`.tmp` behind when the disk refuses; a save killed between its two renames still loads."""

from __future__ import annotations

import errno
import hashlib
import logging
import shutil
import subprocess

import numpy as np
import pytest
import torch

from seqrec.errors import CheckpointError
from seqrec.train import checkpoint
from seqrec.train.checkpoint import digest_path, load_checkpoint, save_checkpoint


def trainer_like_state() -> dict:
    """What TrainingState.state_dict holds mid-epoch: model, optimizer, scheduler and scaler state, per-rank RNG
    streams (torch's, the negatives generator's 128-bit integers) and running loss, numbers, a config dict."""
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "epoch": 3,
        "best_value": -float("inf"),
        "best_metrics": {"val/ndcg@10": 0.25},
        "epoch_batches": 17,
        "rng": [
            {
                "torch": torch.get_rng_state(),
                "cuda": None,
                "epoch_loss": torch.tensor(12.5),
                "sampler_state": np.random.default_rng([1, 2, 0, 1]).bit_generator.state,
            }
        ],
        "wandb_id": None,
        "config": {"model": {"hidden_units": 4, "betas": [0.9, 0.98]}, "seed": 1},
    }


class WritesAMarker:
    """Unpickling this runs code: a crafted checkpoint's payload (exec of a line that creates a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_round_trip_records_a_sha256sum_compatible_digest(tmp_path):
    state = trainer_like_state()
    path = tmp_path / "last.pt"
    save_checkpoint(state, path)
    recorded = digest_path(path).read_text()
    assert recorded == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  last.pt\n"
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "-c", "last.pt.sha256"], cwd=tmp_path, capture_output=True, text=True)
        assert check.returncode == 0 and "OK" in check.stdout
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert loaded["optimizer"]["state"][0]["exp_avg"].shape == (3, 4)
    assert loaded["config"] == state["config"] and loaded["best_value"] == -float("inf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]


def test_a_flipped_byte_is_a_one_line_checksum_mismatch(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(trainer_like_state(), path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = one_line(error)
    assert str(path) in message and "checksum mismatch: the file changed after it was written" in message


def test_a_checkpoint_without_a_digest_loads_with_a_warning(tmp_path, caplog):
    path = tmp_path / "old.pt"
    torch.save(trainer_like_state(), path)  # as seqrec wrote checkpoints before digests
    with caplog.at_level(logging.WARNING, logger="seqrec.train.checkpoint"):
        state = load_checkpoint(path)
    assert state["epoch"] == 3
    assert any("loaded unverified" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("with_digest", [False, True])
def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path, with_digest):
    marker = tmp_path / "marker"
    path = tmp_path / "crafted.pt"
    torch.save({"model": WritesAMarker(marker), "epoch": 1}, path)
    if with_digest:  # whoever crafted it can also write a matching digest: the unpickler must still refuse it
        digest_path(path).write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  crafted.pt\n")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = one_line(error)
    assert str(path) in message and "refused to load" in message and "exec" in message
    assert not marker.exists()
    # the payload is live: what an unrestricted unpickler would call writes the marker (so the refusal above is
    # what kept it away); called directly here, never by unpickling the file
    call, args = WritesAMarker(marker).__reduce__()
    call(*args)
    assert marker.read_text() == "ran"


def test_a_truncated_checkpoint_is_a_one_line_error_with_or_without_its_digest(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(trainer_like_state(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert "checksum mismatch" in one_line(error)
    digest_path(path).unlink()
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert "corrupt or truncated" in one_line(error)


def test_a_full_disk_leaves_the_previous_checkpoint_and_no_tmp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(trainer_like_state(), path)
    before = path.read_bytes(), digest_path(path).read_text()

    def disk_full(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(CheckpointError) as error:
        save_checkpoint({**trainer_like_state(), "epoch": 4}, path)
    assert "no space left on device" in one_line(error) and "previous one is kept" in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]
    assert (path.read_bytes(), digest_path(path).read_text()) == before
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 3


@pytest.mark.parametrize("interrupted_rename", [1, 2])
def test_ctrl_c_during_a_save_leaves_a_checkpoint_that_loads(tmp_path, monkeypatch, interrupted_rename):
    """KeyboardInterrupt right after the checkpoint's rename (1) or inside the digest's (2): the new file is in place,
    so its digest must not be thrown away with the other .tmp files (it was, and the resume refused the file)."""
    path = tmp_path / "last.pt"
    save_checkpoint(trainer_like_state(), path)
    real_replace, calls = checkpoint.os.replace, []

    def replace_then_ctrl_c(src, dst):
        calls.append(dst)
        if len(calls) == interrupted_rename:
            if interrupted_rename == 1:
                real_replace(src, dst)  # the rename happened; the signal lands before the next bytecode
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({**trainer_like_state(), "epoch": 4}, path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]
    assert load_checkpoint(path)["epoch"] == 4


def test_a_failed_json_write_leaves_no_tmp_file(tmp_path):
    with pytest.raises(TypeError):
        checkpoint.write_json({"value": object()}, tmp_path / "results.json")
    assert list(tmp_path.iterdir()) == []


def test_a_save_killed_between_its_renames_still_loads(tmp_path):
    path, newer = tmp_path / "last.pt", tmp_path / "newer.pt"
    save_checkpoint(trainer_like_state(), path)
    save_checkpoint({**trainer_like_state(), "epoch": 4}, newer)
    # the state a kill after the checkpoint's rename and before the digest's leaves: new file, old digest, and the
    # new digest still pending
    shutil.copyfile(newer, path)
    pending = digest_path(path).with_name("last.pt.sha256.tmp")
    pending.write_text(digest_path(newer).read_text().replace("newer.pt", "last.pt"))
    assert load_checkpoint(path)["epoch"] == 4
    assert not pending.exists()  # the interrupted save was completed
    assert digest_path(path).read_text().split()[0] == hashlib.sha256(path.read_bytes()).hexdigest()
    # a pending digest never excuses a damaged file
    pending.write_text(digest_path(path).read_text())
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)


def test_state_that_a_weights_only_load_would_refuse_is_not_written(tmp_path):
    state = {**trainer_like_state(), "best_metrics": {"val/ndcg@10": np.float64(0.25)}}
    with pytest.raises(TypeError, match=r"\['best_metrics'\]\['val/ndcg@10'\] is a numpy.float64"):
        save_checkpoint(state, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_malformed_digest_file_is_named(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(trainer_like_state(), path)
    digest_path(path).write_text("not a digest\n")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(digest_path(path)) in one_line(error) and "sha256sum" in str(error.value)
