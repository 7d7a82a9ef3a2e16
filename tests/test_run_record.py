"""A finished run is never changed by a later command: run.json, the run lock, the resume policy, unique run dirs."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import seqrec.launch  # noqa: F401  (registers config resolvers)
from seqrec.errors import CheckpointError, DataError
from seqrec.run import run
from seqrec.train.resume_policy import allowed_changes, check_resume, config_differences
from seqrec.utils.logging import MetricLogger
from tests.conftest import REPO, TINY, compose_config, train_cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train(run_dir, *overrides, base=TINY, timeout=300):
    """`python train.py TINY overrides hydra.run.dir=run_dir` as a user types it."""
    return train_cli(*base, *overrides, run_dir=run_dir, timeout=timeout)


def fingerprint(folder) -> dict:
    """{relative path: sha1} of every file under `folder`, hidden ones included."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished run made by train.py; each test works on its own copy."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    done = train(folder)
    assert done.returncode == 0, done.stderr
    return folder


@pytest.fixture
def run_dir(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def test_the_first_launch_writes_run_json_and_hydra_writes_nothing_into_the_run(finished_run):
    record = json.loads((finished_run / "run.json").read_text())
    assert set(record) == {"format", "config", "overrides", "choices", "created", "argv"}
    assert record["format"] == 1
    assert record["overrides"] == TINY  # the task overrides, as overrides.yaml had them (hydra.* apart)
    assert record["choices"]["model"] == "tisasrec" and record["choices"]["residual"] == "mhc"
    assert not any(key.startswith("hydra/") for key in record["choices"])
    assert record["config"]["optimizer"]["lr"] == 0.001 and record["config"]["trainer"]["output_dir"] == str(
        finished_run
    )
    assert not (finished_run / ".hydra").exists()
    results = json.loads((finished_run / "results.json").read_text())
    assert results["config"] == record["config"]
    assert not (finished_run / "launches.jsonl").exists()  # no resume yet
    assert (finished_run / ".lock").read_text() == ""  # released: the lock file is empty at rest


def test_a_resume_with_another_lr_is_refused_in_one_line_and_changes_no_file(run_dir):
    before = fingerprint(run_dir)
    refused = train(run_dir, "optimizer.lr=0.002", "trainer.num_epochs=4")
    assert refused.returncode == 1
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "optimizer.lr: 0.001 -> 0.002" in errors[0], refused.stderr
    assert "Traceback" not in refused.stderr
    assert fingerprint(run_dir) == before  # train.log included


def test_resume_never_on_an_existing_run_changes_no_file(run_dir):
    before = fingerprint(run_dir)
    refused = train(run_dir, "trainer.resume=never")
    assert refused.returncode == 1 and "refusing to overwrite" in refused.stderr
    assert fingerprint(run_dir) == before


def test_a_config_error_on_a_finished_run_changes_no_file(run_dir):
    before = fingerprint(run_dir)
    refused = train(run_dir, "optimizer.lr=-1")
    assert refused.returncode == 1 and "optimizer.lr=-1: must be > 0" in refused.stderr
    assert fingerprint(run_dir) == before


def test_relaunching_a_finished_run_reports_its_results_and_rewrites_nothing(run_dir):
    before = fingerprint(run_dir)
    again = train(run_dir)
    assert again.returncode == 0, again.stderr
    assert "stored results" in again.stdout + again.stderr
    after = fingerprint(run_dir)
    assert {k: v for k, v in after.items() if k != "train.log"} == {k: v for k, v in before.items() if k != "train.log"}


@pytest.mark.parametrize("error", ["config", "data"])
def test_a_launch_that_fails_before_training_leaves_no_run_record(tmp_path, error):
    if error == "config":
        failed = train(tmp_path / "run", "optimizer.lr=-1")
        needle = "optimizer.lr=-1: must be > 0"
    else:
        (tmp_path / "bad.txt").write_text("1 2\n3 x\n")
        tiny_file = [o for o in TINY if not o.startswith("dataset.")]
        failed = train(tmp_path / "run", "dataset=file", f"dataset.path={tmp_path / 'bad.txt'}", base=tiny_file)
        needle = "bad.txt:2"
    assert failed.returncode == 1 and needle in failed.stderr, failed.stderr
    assert not (tmp_path / "run" / "run.json").exists()


def test_a_second_process_on_a_locked_run_is_refused_naming_the_holder(run_dir):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from seqrec.train.run_record import RunLock; "
            "lock = RunLock(Path(sys.argv[1])); lock.acquire(); lock.announce(); print('held', flush=True); "
            "time.sleep(120)",
            str(run_dir),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = fingerprint(run_dir)
        second = train(run_dir, "trainer.num_epochs=4")
        assert second.returncode == 1
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"pid {holder.pid} on " in errors[0] and "is in use" in errors[0], second.stderr
        assert fingerprint(run_dir) == before
        assert holder.poll() is None  # the holder is undisturbed
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_real_runs_on_one_directory_the_second_is_refused_and_the_first_finishes(tmp_path):
    folder = tmp_path / "run"
    args = [sys.executable, "train.py", *TINY, "dataset.num_users=1500", "trainer.num_epochs=6"]
    first = subprocess.Popen(
        args + [f"hydra.run.dir={folder}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV
    )
    deadline = time.time() + 120
    while not (folder / ".lock").is_file() or not (folder / ".lock").read_text():
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.05)
    second = train(folder, "dataset.num_users=1500", "trainer.num_epochs=6")
    assert second.returncode == 1 and f"pid {first.pid} on " in second.stderr, second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()
    results = json.loads((folder / "results.json").read_text())
    assert results["epochs_run"] == 6 and not (folder / "launches.jsonl").exists()


def resolve_run_dir(extra_env: dict | None = None) -> subprocess.Popen:
    code = (
        "from hydra import compose, initialize_config_dir; from omegaconf import OmegaConf; import seqrec.launch; "
        f"initialize_config_dir(config_dir='{REPO / 'conf'}', version_base='1.3'); "
        "cfg = compose('train', return_hydra_config=True); print(cfg.hydra.run.dir)"
    )
    env = {**ENV, **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)


def test_two_launches_in_the_same_second_get_different_run_dirs():
    first, second = resolve_run_dir(), resolve_run_dir()
    dirs = [p.communicate(timeout=120)[0].strip() for p in (first, second)]
    assert all(d.startswith("outputs/runs/") for d in dirs) and dirs[0] != dirs[1], dirs


def test_the_ranks_of_one_torchrun_launch_share_one_run_dir():
    # torchrun's workers are children of one agent: here two children of this process with its environment
    ranks = [resolve_run_dir({"TORCHELASTIC_RUN_ID": "x", "RANK": str(r), "WORLD_SIZE": "2"}) for r in (0, 1)]
    dirs = [p.communicate(timeout=120)[0].strip() for p in ranks]
    assert dirs[0] == dirs[1] and dirs[0].startswith("outputs/runs/"), dirs


def test_a_slurm_step_keeps_its_run_dir_id_on_every_task_and_requeue():
    slurm = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"}
    dirs = [p.communicate(timeout=120)[0].strip() for p in (resolve_run_dir(slurm), resolve_run_dir(slurm))]
    assert all(d.endswith("-j70_3.0") for d in dirs), dirs


# lr 1e-12 moves no fp32 weight: validation never improves after epoch 1, so patience alone decides the stop
FLAT = TINY + ["trainer.num_epochs=10", "optimizer.lr=1e-12"]


def test_a_resume_with_more_patience_is_allowed_used_and_recorded(tmp_path):
    stopped = run(compose_config(FLAT + ["trainer.patience=1", "trainer.time_limit_min=1e-6"], tmp_path))
    assert stopped["epochs_run"] == 0 and stopped["steps"] == 1 and stopped["time_limited"]  # one step into epoch 1
    resumed = run(compose_config(FLAT + ["trainer.patience=2"], tmp_path))
    # the validation at the stop is the best; patience 2 stops after epochs 1 and 2 (patience 1 would at 1)
    assert resumed["epochs_run"] == 2 and resumed["stopped_early"]
    assert resumed["config"]["trainer"]["patience"] == 2
    assert json.loads((tmp_path / "results.json").read_text())["config"]["trainer"]["patience"] == 2
    (launch,) = [json.loads(x) for x in (tmp_path / "launches.jsonl").read_text().splitlines()]
    assert launch["resumed_at_epoch"] == 0 and launch["resumed_at_step"] == 1
    assert launch["changed"] == {"trainer.patience": [1, 2], "trainer.time_limit_min": [1e-6, 0]}


def test_a_resume_with_another_lr_is_refused_by_the_trainer_too(tmp_path):
    run(compose_config(TINY + ["trainer.time_limit_min=1e-6"], tmp_path))
    before = fingerprint(tmp_path)
    with pytest.raises(CheckpointError, match=r"optimizer.lr: 0.001 -> 0.002\)"):
        run(compose_config(TINY + ["optimizer.lr=0.002"], tmp_path))
    assert fingerprint(tmp_path) == before


@pytest.mark.parametrize(
    "key,old,new",
    [
        ("optimizer.lr", 0.001, 0.002),
        ("sampler.batch_size", 128, 256),
        ("trainer.devices", 1, 2),
        ("trainer.amp_dtype", "bfloat16", "float16"),
        ("schedule.warmup_steps", 100, 0),
        ("trainer.grad_clip", 0.0, 1.0),
        ("trainer.deterministic", True, False),
        ("seed", 42, 43),
        ("eval.protocol", "full", "sampled"),
        ("trainer.monitor", "val/ndcg@10", "val/hr@10"),
    ],
)
def test_settings_that_change_the_trajectory_are_refused(key, old, new):
    saved = {"optimizer": {"lr": 0.001}, "trainer": {}, "sampler": {}, "eval": {}}
    current = json.loads(json.dumps(saved))
    *parents, leaf = key.split(".")
    for node in (saved, current):
        target = node
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = old if node is saved else new
    assert config_differences(saved, current) == [f"{key}: {old!r} -> {new!r}"]
    with pytest.raises(CheckpointError, match=f"{key}: "):
        check_resume(saved, current, "run")
    assert allowed_changes(saved, current) == {}


def test_budget_bookkeeping_and_implementation_settings_may_change():
    saved = {"trainer": {"num_epochs": 10, "num_workers": 1, "eval_every": 5}, "logger": {"wandb": False}}
    current = {"trainer": {"num_epochs": 20, "num_workers": 0, "eval_every": 1}, "logger": {"wandb": True}}
    check_resume(saved, current, "run")
    assert allowed_changes(saved, current) == {
        "logger.wandb": [False, True],
        "trainer.eval_every": [5, 1],
        "trainer.num_epochs": [10, 20],
        "trainer.num_workers": [1, 0],
    }


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_with_a_warning(tmp_path, caplog):
    logger = MetricLogger(output_dir=str(tmp_path))
    logger.log({"train/loss": 1.0}, epoch=1, step=10)
    logger.log({"train/loss": 0.9}, epoch=2, step=20)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "step": 30, "train/lo')  # the kill came mid-write
    with caplog.at_level("WARNING"):
        logger.truncate_after(2)
    assert "cut short by a kill" in caplog.text and "metrics.jsonl:3" in caplog.text
    assert [json.loads(x)["epoch"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_an_unreadable_metrics_line_before_the_last_is_an_error_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epo\n{"epoch": 2}\n')
    before = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not a JSON line"):
        MetricLogger(output_dir=str(tmp_path)).truncate_after(5)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_a_resume_after_a_kill_mid_write_of_metrics_goes_on(tmp_path):
    run(compose_config(TINY + ["trainer.time_limit_min=1e-6"], tmp_path))  # stops one step into epoch 1
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "step": 9, "tra')
    results = run(compose_config(TINY, tmp_path))
    assert results["epochs_run"] == 2
    # the stopped launch's line for its part of epoch 1 (0 epochs complete), then epochs 1 and 2
    assert [json.loads(x)["epoch"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_each_job_of_a_sweep_gets_its_own_run_json_with_its_overrides(tmp_path):
    done = train_cli("-m", *TINY, "optimizer.lr=0.001,0.002", f"hydra.sweep.dir={tmp_path}")
    assert done.returncode == 0, done.stderr
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/run.json"))]
    assert sorted(r["config"]["optimizer"]["lr"] for r in records) == [0.001, 0.002]
    for record in records:
        assert f"optimizer.lr={record['config']['optimizer']['lr']}" in record["overrides"]
        assert [o.split("=")[0] for o in TINY] == [o.split("=")[0] for o in record["overrides"][:-1]]
    assert not list(tmp_path.rglob(".hydra"))
