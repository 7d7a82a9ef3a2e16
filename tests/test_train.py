"""End-to-end training on the bundled data: it learns, it resumes exactly, and it fails safely."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

import seqrec.launch  # noqa: F401  (registers config resolvers)
from seqrec.errors import CheckpointError, DataError, TrainingError
from seqrec.eval.baselines import Popularity
from seqrec.run import run
from seqrec.train import losses
from seqrec.train.resume_policy import config_differences
from tests.conftest import REPO, TINY, TINY_FILE, compose_config

LEARN = [
    "dataset.num_users=600",
    "dataset.num_items=300",
    "model.maxlen=50",
    "trainer.num_epochs=15",
    "trainer.eval_every=5",
    "schedule.warmup_steps=0",
    "trainer.progress=false",
    "trainer.device=cpu",
    "optimizer.lr=0.005",
    "sampler.batch_size=64",
]


def test_smoke_run_beats_popularity_and_writes_the_run_directory(tmp_path):
    cfg = compose_config(LEARN, tmp_path)
    results = run(cfg)
    data = instantiate(cfg.dataset)
    popularity = instantiate(cfg.eval, data=data).evaluate(Popularity(data), "valid")["val/ndcg@10"]
    assert results["val/ndcg@10"] > popularity + 0.1, (results["val/ndcg@10"], popularity)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    for key in (
        "best_epoch",
        "epochs_run",
        "train_seconds",
        "eval_seconds",
        "test/ndcg@10",
        "test/hr@10",
        "val/mrr@20",
        "test/ndcg@5",
    ):
        assert key in on_disk
    assert (tmp_path / "checkpoints" / "last.pt").exists() and (tmp_path / "checkpoints" / "best.pt").exists()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(1, 16))
    assert lines[-1]["train/loss"] < lines[0]["train/loss"]


def test_best_checkpoint_is_chosen_on_validation_and_test_runs_once_on_it(tmp_path):
    cfg = compose_config(
        LEARN[:3]
        + [
            "trainer.num_epochs=6",
            "trainer.eval_every=2",
            "trainer.progress=false",
            "trainer.device=cpu",
            "optimizer.lr=0.005",
        ],
        tmp_path,
    )
    results = run(cfg)
    val = {
        x["epoch"]: x["val/ndcg@10"]
        for x in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
        if "val/ndcg@10" in x
    }
    assert results["best_epoch"] == max(val, key=val.get)
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == results["best_epoch"]
    assert not any(k.startswith("test/") for k in best["best_metrics"])


def test_time_limit_stops_at_a_step_boundary_mid_epoch_validates_and_tests_the_best_checkpoint(tmp_path):
    # a limit of ~0 s is over at the first step boundary: training stops inside epoch 1 (of 50, eval_every=5)
    cfg = compose_config(
        TINY + ["trainer.num_epochs=50", "trainer.eval_every=5", "trainer.time_limit_min=1e-6"], tmp_path
    )
    results = run(cfg)
    assert results["time_limited"] is True and results["epochs_run"] == 0 and results["steps"] == 1
    assert results["best_epoch"] == 0 and "val/ndcg@10" in results and "test/ndcg@10" in results
    (line,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (line["epoch"], line["step"], line["train/epoch_batches"]) == (0, 1, 1) and "val/ndcg@10" in line
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["epoch_batches"]) == (0, 1, 1)


def final_state(tmp_path, extra):
    run(compose_config(TINY + ["trainer.num_epochs=4"] + extra, tmp_path))
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    return state, json.loads((tmp_path / "results.json").read_text())


def test_resume_reaches_the_same_result_as_an_unbroken_run(tmp_path):
    unbroken, unbroken_results = final_state(tmp_path / "a", [])
    run(compose_config(TINY + ["trainer.num_epochs=2"], tmp_path / "b"))  # "killed" after 2 epochs
    resumed, resumed_results = final_state(tmp_path / "b", [])  # same dir, resume=auto
    for name, tensor in unbroken["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for key in ("val/ndcg@10", "test/ndcg@10", "test/hr@10", "best_epoch", "epochs_run"):
        assert unbroken_results[key] == resumed_results[key]
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


# lr 1e-12 moves no fp32 weight, so validation never improves after epoch 1 and patience 1 runs out every epoch
FLAT = TINY + ["trainer.num_epochs=10", "optimizer.lr=1e-12", "trainer.patience=1"]


def logged(folder, key):
    return [x[key] for x in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]


def test_plateau_decay_lowers_the_lr_when_patience_runs_out_then_stops_early(tmp_path):
    results = run(compose_config(FLAT + ["trainer.plateau_decays=2", "trainer.plateau_factor=0.5"], tmp_path))
    # epoch 1 is the best; 2 and 3 each run out of patience and halve the lr; 4 runs out with no decay left
    assert results["epochs_run"] == 4 and results["stopped_early"] and results["best_epoch"] == 1
    assert logged(tmp_path, "train/lr") == pytest.approx([1e-12, 1e-12, 5e-13, 2.5e-13], rel=1e-6)
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["lr_decays"] == 2


def test_an_early_stopped_run_resumed_with_a_plateau_decay_continues_as_an_unbroken_run(tmp_path):
    unbroken = run(compose_config(FLAT + ["trainer.plateau_decays=1"], tmp_path / "a"))
    stopped = run(compose_config(FLAT, tmp_path / "b"))
    assert stopped["epochs_run"] == 2 and stopped["stopped_early"]
    resumed = run(compose_config(FLAT + ["trainer.plateau_decays=1"], tmp_path / "b"))
    assert resumed["epochs_run"] == unbroken["epochs_run"] == 3
    assert logged(tmp_path / "b", "train/lr") == logged(tmp_path / "a", "train/lr")
    assert resumed["test/ndcg@10"] == unbroken["test/ndcg@10"]


def test_cosine_schedule_anneals_the_lr_to_zero_at_the_end_of_the_epoch_budget(tmp_path):
    overrides = ["trainer.num_epochs=4", "optimizer.lr=0.01", "schedule.warmup_steps=0", "schedule=cosine"]
    run(compose_config(TINY + overrides, tmp_path))
    # each epoch logs the lr set for the step after its last: lr * (1 + cos(pi * epoch / 4)) / 2
    expected = [0.01 * (1 + np.cos(np.pi * epoch / 4)) / 2 for epoch in (1, 2, 3, 4)]
    assert logged(tmp_path, "train/lr") == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_a_cosine_run_stopped_and_resumed_follows_the_same_lr_and_weights_as_an_unbroken_one(tmp_path):
    cosine = TINY + ["trainer.num_epochs=4", "schedule=cosine"]
    unbroken, unbroken_results = final_state(tmp_path / "a", ["schedule=cosine"])
    stopped = run(compose_config(cosine + ["trainer.time_limit_min=1e-6"], tmp_path / "b"))  # stops after step 1
    assert stopped["epochs_run"] == 0 and stopped["steps"] == 1
    resumed, resumed_results = final_state(tmp_path / "b", ["schedule=cosine"])  # continues inside epoch 1
    # the stopped launch logged one line for its part of epoch 1 (with its validation); then the epochs as unbroken
    assert logged(tmp_path / "b", "train/lr")[1:] == logged(tmp_path / "a", "train/lr")
    assert logged(tmp_path / "a", "train/lr")[-1] == pytest.approx(0.0, abs=1e-12)
    for name, tensor in unbroken["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert resumed_results["steps"] == unbroken_results["steps"]


def test_resuming_a_cosine_run_under_a_longer_budget_warns_that_the_lr_curve_changes(tmp_path, caplog):
    cosine = TINY + ["schedule=cosine", "trainer.time_limit_min=1e-6"]
    run(compose_config(cosine + ["trainer.num_epochs=4"], tmp_path))
    with caplog.at_level("WARNING", logger="seqrec.train.trainer"):
        run(compose_config(cosine + ["trainer.num_epochs=6"], tmp_path))
    assert "schedule=cosine over 4 epochs, now schedule=cosine over 6" in caplog.text


@pytest.mark.slow
def test_a_killed_process_resumes_from_its_last_checkpoint(tmp_path):
    args = [
        sys.executable,
        "train.py",
        *TINY,
        "dataset.num_users=1500",
        "trainer.num_epochs=6",
        f"hydra.run.dir={tmp_path}/killed",
    ]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "results.json").exists()
    subprocess.run(args, cwd=REPO, check=True, capture_output=True, timeout=300)
    subprocess.run(
        args[:-1] + [f"hydra.run.dir={tmp_path}/whole"], cwd=REPO, check=True, capture_output=True, timeout=300
    )
    killed = json.loads((tmp_path / "killed" / "results.json").read_text())
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert {k: v for k, v in killed.items() if "/" in k} == {k: v for k, v in whole.items() if "/" in k}


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = losses.BCE.__call__

    def poisoned(self, *args):
        calls["n"] += 1
        value = original(self, *args)
        return value * float("nan") if calls["n"] > 3 else value

    cfg = compose_config(TINY + ["trainer.num_epochs=3", "sampler.batch_size=128"], tmp_path)
    monkeypatch.setattr(losses.BCE, "__call__", poisoned)
    with pytest.raises(TrainingError, match=r"loss became nan in epoch 2.*last.pt \(epoch 1\)"):
        run(cfg)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint_on_resume_is_a_clear_error_and_destroys_nothing(tmp_path, damage):
    cfg = compose_config(TINY, tmp_path)
    run(cfg)
    last = tmp_path / "checkpoints" / "last.pt"
    if damage == "garbage":
        last.write_bytes(b"not a checkpoint at all")
    else:
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = {p.name: p.read_bytes() for p in [last, tmp_path / "checkpoints" / "best.pt", tmp_path / "results.json"]}
    with pytest.raises(CheckpointError, match=r"last.pt: checksum mismatch: the file changed after it was written"):
        run(compose_config(TINY + ["trainer.num_epochs=3"], tmp_path))
    after = {p.name: p.read_bytes() for p in [last, tmp_path / "checkpoints" / "best.pt", tmp_path / "results.json"]}
    assert before == after


def test_resume_never_refuses_to_overwrite_an_existing_run(tmp_path):
    run(compose_config(TINY, tmp_path))
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        run(compose_config(TINY + ["trainer.resume=never"], tmp_path))
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before


def test_resume_with_a_different_model_is_refused(tmp_path):
    run(compose_config(TINY, tmp_path))
    with pytest.raises(CheckpointError, match="model.hidden_units"):
        run(compose_config(TINY + ["model.hidden_units=16", "trainer.num_epochs=3"], tmp_path))


def test_resume_may_change_how_the_same_maths_is_computed():
    saved = {"loss": {"chunk_tokens": 256}, "residual": {"kernel": "native", "n": 4}, "seed": 1}
    moved = {"loss": {"chunk_tokens": None}, "residual": {"kernel": "eager", "n": 4}, "seed": 1}
    assert config_differences(saved, moved) == []
    moved["residual"]["n"] = 2
    assert config_differences(saved, moved) == ["residual.n: 4 -> 2"]


def test_users_with_fewer_than_three_interactions_train_but_are_not_evaluated(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for user in range(60):
        n = [1, 2][user] if user < 2 else int(rng.integers(3, 12))
        lines += [f"{user} {item} {1000 + t}" for t, item in enumerate(rng.integers(1, 40, size=n))]
    path = tmp_path / "few.txt"
    path.write_text("\n".join(lines) + "\n")
    results = run(compose_config(TINY_FILE + ["dataset=file", f"dataset.path={path}"], tmp_path / "run"))
    assert 0 <= results["test/ndcg@10"] <= 1


@pytest.mark.parametrize("content,needle", [("", "empty file"), ("1 2\n3 x\n", "bad.txt:2")])
def test_bad_data_files_fail_before_any_output(tmp_path, content, needle):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=needle):
        run(compose_config(TINY_FILE + ["dataset=file", f"dataset.path={path}"], tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_mhc_runs_log_their_mapping_diagnostics_with_each_validation(tmp_path):
    run(compose_config(TINY + ["residual=mhc", "model.norm_first=true"], tmp_path))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(r["mhc/composite_fwd_gain"] - 1) < 0.05 for r in records)  # H_res products stay ~stochastic
    assert not any(k.startswith("mhc/") for k in json.loads((tmp_path / "results.json").read_text()))
