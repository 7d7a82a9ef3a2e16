"""logger=wandb against the real wandb library in offline mode: the run files it writes hold the config, the
per-epoch metrics and the final summary; a resume continues the same run; no key / no network never fails a run."""

from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")

from seqrec.utils.logging import MetricLogger  # noqa: E402

BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log: 7-byte file header, then records in 32 KiB blocks


def read_wandb_records(path: Path) -> list:
    """Every protobuf Record of an offline run's `run-<id>.wandb` file (wandb 0.2x-0.3x has no Python reader)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    records, pos, chunks = [], 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # still being written
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def offline_run(run_dir: Path) -> dict:
    """{"run": run record, "history": [dict per wandb.log], "summary": {...}, "config": {...}, "exit": code} of the
    one offline run under `run_dir/wandb/` (the latest if there are several)."""
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {run_dir}/wandb"
    # wandb.finish() can return before wandb-core has flushed the file (the process's exit waits for it): poll
    deadline = time.monotonic() + 30
    records = read_wandb_records(files[-1])
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = read_wandb_records(files[-1])
    out = {"run": None, "history": [], "summary": {}, "config": {}, "exit": None, "files": files}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update(
                {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.summary.update}
            )
        elif kind == "exit":
            out["exit"] = r.exit.exit_code
    return out


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def make_logger(run_dir: Path, **kw) -> MetricLogger:
    opts = dict(
        output_dir=str(run_dir),
        wandb=True,
        project="seqrec-test",
        mode="offline",
        group="sweep-a",
        name="model.hidden_units=128",
        init_timeout=30,
    )
    opts.update(kw)
    return MetricLogger(**opts)


def test_offline_run_files_hold_config_metrics_and_summary(tmp_path, offline, caplog):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.pt").write_bytes(b"x")
    logger = make_logger(tmp_path)
    with caplog.at_level(logging.INFO, logger="seqrec.utils.logging"):
        run_id = logger.start({"model": {"hidden_units": 128}, "trainer": {"lr": 0.001}}, None)
    assert run_id
    assert any("wandb sync" in m for m in caplog.messages), "one line must say how to upload the offline run"
    logger.log({"train/loss": 1.5, "train/lr": 0.001}, epoch=1, step=10)
    logger.log({"train/loss": 1.2, "train/lr": 0.001, "val/ndcg@10": 0.25}, epoch=2, step=20)
    logger.summary({"best_epoch": 2, "test/ndcg@10": 0.2, "val/ndcg@10": 0.25})
    logger.close()
    logger.close()  # idempotent

    run = offline_run(tmp_path)
    assert run["run"].run_id == run_id
    assert run["run"].run_group == "sweep-a"
    assert run["run"].display_name == "model.hidden_units=128"
    assert run["config"]["model"] == {"hidden_units": 128} and run["config"]["trainer"] == {"lr": 0.001}
    losses = [h["train/loss"] for h in run["history"] if "train/loss" in h]
    assert losses == [1.5, 1.2]
    assert [h["epoch"] for h in run["history"] if "train/loss" in h] == [1, 2]
    assert [h["val/ndcg@10"] for h in run["history"] if "val/ndcg@10" in h] == [0.25]
    assert run["summary"]["test/ndcg@10"] == 0.2
    assert run["summary"]["best_checkpoint"] == str((tmp_path / "checkpoints" / "best.pt").resolve())
    assert run["exit"] == 0
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2  # metrics.jsonl is written as without W&B


def test_resume_continues_the_same_run_id(tmp_path, offline):
    first = make_logger(tmp_path)
    run_id = first.start({}, None)
    first.log({"train/loss": 1.0}, epoch=1, step=1)
    first.close()
    second = make_logger(tmp_path)
    assert second.start({}, run_id) == run_id
    second.log({"train/loss": 0.9}, epoch=2, step=2)
    second.close()
    files = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)


def test_close_during_an_exception_marks_the_run_failed(tmp_path, offline):
    logger = make_logger(tmp_path)
    logger.start({}, None)
    with pytest.raises(RuntimeError):
        try:
            raise RuntimeError("training crashed")
        finally:
            logger.close()
    assert offline_run(tmp_path)["exit"] == 1


def test_online_without_a_key_falls_back_to_offline(tmp_path, offline, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "login", lambda *a, **k: False)  # as on a machine where nobody ran `wandb login`
    logger = make_logger(tmp_path, mode="online")
    with caplog.at_level(logging.WARNING, logger="seqrec.utils.logging"):
        run_id = logger.start({}, None)
    logger.log({"train/loss": 1.0}, epoch=1, step=1)
    logger.close()
    assert run_id and any("offline" in m for m in caplog.messages)
    assert offline_run(tmp_path)["history"][0]["train/loss"] == 1.0


FAKE_KEY = "a" * 40  # well-formed; never checked, as no W&B server is reachable from the tests


@pytest.fixture
def online_env(monkeypatch):
    """An online start as a user would make it: a key, no WANDB_MODE (the config says online)."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_SILENT", "true")


def _start_and_log(logger: MetricLogger, caplog) -> tuple[str, float]:
    began = time.monotonic()
    with caplog.at_level(logging.INFO, logger="seqrec.utils.logging"):
        run_id = logger.start({"trainer": {"lr": 0.001}}, None)
    elapsed = time.monotonic() - began
    logger.log({"train/loss": 1.5}, epoch=1, step=10)
    logger.log({"train/loss": 1.2}, epoch=2, step=20)
    logger.close()
    return run_id, elapsed


def _offline_fallback_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_online_without_an_answering_server_records_offline_within_10_s(tmp_path, online_env, monkeypatch, caplog):
    """No network: wandb.init alone would wait out init_timeout (60 s here, the config's default) and then refuse
    the offline retry ("run ID is in use"); the probe decides in seconds and the run is recorded offline."""
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: connection refused
    run_id, elapsed = _start_and_log(make_logger(tmp_path, mode="online", init_timeout=60), caplog)
    assert elapsed < 10, f"fallback took {elapsed:.1f} s"
    warnings = _offline_fallback_warnings(caplog)
    assert len(warnings) == 1 and "http://127.0.0.1:9 does not answer" in warnings[0], warnings
    assert f"wandb sync {tmp_path / 'wandb' / 'offline-run-'}" in warnings[0]
    run = offline_run(tmp_path)
    assert run["run"].run_id == run_id
    assert [h["train/loss"] for h in run["history"]] == [1.5, 1.2]
    assert run["exit"] == 0


@pytest.mark.slow
def test_a_failed_online_start_records_the_same_run_offline(tmp_path, online_env, monkeypatch, caplog):
    """A server that answers but cannot start the run (every request: HTTP 500): after init_timeout the same run id
    is recorded offline, so `wandb sync` later uploads it as the run it was meant to be."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Failing(BaseHTTPRequestHandler):
        def fail(self):
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_HEAD = fail

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        run_id, elapsed = _start_and_log(make_logger(tmp_path, mode="online", init_timeout=3), caplog)
    finally:
        server.shutdown()
    assert elapsed < 3 + 15, f"fallback took {elapsed:.1f} s"
    warnings = _offline_fallback_warnings(caplog)
    assert len(warnings) == 1 and "the online start failed" in warnings[0] and "wandb sync" in warnings[0], warnings
    run = offline_run(tmp_path)
    assert run["run"].run_id == run_id and run["files"][-1].name == f"run-{run_id}.wandb"
    assert [h["train/loss"] for h in run["history"]] == [1.5, 1.2]


def test_failing_wandb_init_never_fails_the_run(tmp_path, offline, monkeypatch):
    def broken_init(*a, **k):
        raise wandb.errors.CommError("network unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    logger = make_logger(tmp_path)
    logger.start({}, None)
    logger.log({"train/loss": 1.0}, epoch=1, step=1)
    logger.summary({"best_epoch": 1})
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["train/loss"] == 1.0


def test_disabled_mode_and_other_ranks_write_no_wandb_files(tmp_path, offline):
    for logger in (make_logger(tmp_path, mode="disabled"), make_logger(tmp_path, rank=1)):
        logger.start({}, None)
        logger.log({"train/loss": 1.0}, epoch=1, step=1)
        logger.close()
    assert not (tmp_path / "wandb").exists()


def test_a_resumed_training_run_continues_its_wandb_run(tmp_path, offline):
    """Through the real entry point: the W&B id is saved in the checkpoint, and `trainer.resume=auto` (a requeue,
    or re-running with more epochs) continues that W&B run."""
    import torch
    from hydra import compose, initialize_config_dir

    from seqrec.run import run

    conf = Path(__file__).resolve().parents[1] / "conf"

    def train(epochs: int) -> None:
        overrides = [
            "hardware=cpu",
            "logger=wandb",
            "logger.name=resume-test",
            "dataset.num_users=100",
            "model.maxlen=10",
            "model.hidden_units=16",
            "trainer.eval_every=1",
            "trainer.progress=false",
            f"trainer.num_epochs={epochs}",
            f"trainer.output_dir={tmp_path}",
            f"logger.output_dir={tmp_path}",
        ]
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            run(compose(config_name="train", overrides=overrides))

    train(1)
    run_id = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["wandb_id"]
    assert run_id
    train(2)
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["wandb_id"] == run_id
    files = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2
    resumed = offline_run(tmp_path)
    assert [h["epoch"] for h in resumed["history"]] == [2]  # the second part logs only the new epoch
    assert resumed["summary"]["epochs_run"] == 2
