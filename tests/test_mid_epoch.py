"""Stops inside an epoch: a kill after a mid-epoch last.pt, a preemption signal, resumed to the unbroken run's result.

A resume from a mid-epoch `last.pt` must give bitwise the unbroken run's weights (last.pt, best.pt), metrics and
metrics.jsonl (wall-clock seconds aside), without a forward pass or a batch spent on the finished part of the epoch.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from seqrec.run import run
from seqrec.train.sampler import TrainSampler
from seqrec.train.step_clock import CHECK_EVERY_S, StepClock
from seqrec.train.stop_signals import StoppedBySignal
from seqrec.train.trainer import Trainer
from tests.conftest import TINY, compose_config

# 300 users in batches of 32: 10 steps per epoch, 30 in all
RUN = [*TINY, "sampler.batch_size=32", "trainer.num_epochs=3"]
STEPS_PER_EPOCH = 10
TIMING = ("train_seconds", "eval_seconds", "train/seconds")


class Killed(Exception):
    """Stands in for SIGKILL: nothing after it runs."""


def _results(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in TIMING and k != "config"}


def _lines(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines]


def _checkpoint(run_dir, name: str = "last.pt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)


def assert_same_run(resumed: dict, resumed_dir, unbroken: tuple) -> None:
    unbroken, unbroken_dir = unbroken
    assert _results(resumed) == _results(unbroken)
    assert _lines(resumed_dir) == _lines(unbroken_dir)
    for name in ("last.pt", "best.pt"):
        a, b = _checkpoint(resumed_dir, name), _checkpoint(unbroken_dir, name)
        assert a["model"].keys() == b["model"].keys()
        for key, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][key]), (name, key)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> dict:
    """The unbroken run of each batch-building mode (the results are the same for both)."""
    runs = {}
    for workers in (0, 1):
        run_dir = tmp_path_factory.mktemp(f"unbroken{workers}")
        runs[workers] = (run(compose_config([*RUN, f"trainer.num_workers={workers}"], run_dir)), run_dir)
    return runs


def at_step(monkeypatch, step: int, action) -> None:
    """Call `action()` just before optimizer step `step + 1` (once)."""
    original = Trainer.train_step

    def train_step(self, batch):
        if self.progress.step == step:
            action()
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_run_killed_mid_epoch_resumes_to_the_unbroken_run_without_redoing_a_batch(
    tmp_path, monkeypatch, unbroken, workers
):
    config = [*RUN, f"trainer.num_workers={workers}"]

    def kill():
        raise Killed

    with monkeypatch.context() as patch:  # every step boundary writes last.pt; killed in step 14 (epoch 2)
        at_step(patch, 13, kill)
        with pytest.raises(Killed):
            run(compose_config([*config, "trainer.checkpoint_every_min=1e-9"], tmp_path))
    state = _checkpoint(tmp_path)
    assert (state["epoch"], state["step"], state["epoch_batches"]) == (1, 13, 3)

    built, steps = [], []  # what the resumed launch computes
    make_batch, train_step = TrainSampler.make_batch, Trainer.train_step
    monkeypatch.setattr(TrainSampler, "make_batch", lambda self, *a: built.append(1) or make_batch(self, *a))
    monkeypatch.setattr(Trainer, "train_step", lambda self, b: steps.append(1) or train_step(self, b))
    resumed = run(compose_config(config, tmp_path))  # checkpoint_every_min may change on resume
    assert len(steps) == len(built) == 3 * STEPS_PER_EPOCH - 13  # nothing of the 13 finished steps again
    assert_same_run(resumed, tmp_path, unbroken[workers])


def test_a_preemption_signal_mid_epoch_writes_last_pt_at_the_next_step_boundary_and_ends_the_run(
    tmp_path, monkeypatch, unbroken
):
    with monkeypatch.context() as patch:
        at_step(patch, 13, lambda: os.kill(os.getpid(), signal.SIGUSR1))
        with pytest.raises(StoppedBySignal, match="SIGUSR1"):
            run(compose_config(RUN, tmp_path))
    state = _checkpoint(tmp_path)
    assert (state["epoch"], state["step"], state["epoch_batches"]) == (1, 14, 4)  # the step in progress finished
    assert not (tmp_path / "results.json").exists()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the run's handler is gone with the run
    resumed = run(compose_config(RUN, tmp_path))
    assert_same_run(resumed, tmp_path, unbroken[1])


def test_a_signal_with_its_own_handler_gets_a_mid_epoch_checkpoint_first_then_the_handler_and_training_goes_on(
    tmp_path, monkeypatch, unbroken
):
    """As under submitit, whose SIGUSR2 handler requeues the job: our checkpoint comes first."""
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(_checkpoint(tmp_path)["step"]))
    try:
        at_step(monkeypatch, 13, lambda: os.kill(os.getpid(), signal.SIGUSR2))
        results = run(compose_config(RUN, tmp_path))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [14]  # the handler ran once, after last.pt recorded step 14
    assert _results(results) == _results(unbroken[1][0])
    assert _lines(tmp_path) == _lines(unbroken[1][1])


def test_a_signal_during_validation_acts_at_once_and_the_resume_redoes_only_the_validation(
    tmp_path, monkeypatch, unbroken
):
    from seqrec.eval.evaluator import Evaluator

    evaluate = Evaluator.evaluate

    def signalled(self, *args, **kwargs):
        if args[1] == "valid":  # a validation may outlast the warning: the signal does not wait for it
            os.kill(os.getpid(), signal.SIGUSR1)
        return evaluate(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Evaluator, "evaluate", signalled)
        with pytest.raises(StoppedBySignal, match="SIGUSR1"):
            run(compose_config(RUN, tmp_path))
    state = _checkpoint(tmp_path)  # written before the validation: every batch of epoch 1 done, the epoch not closed
    assert (state["epoch"], state["step"], state["epoch_batches"]) == (0, STEPS_PER_EPOCH, STEPS_PER_EPOCH)
    assert not (tmp_path / "metrics.jsonl").exists()
    resumed = run(compose_config(RUN, tmp_path))
    assert_same_run(resumed, tmp_path, unbroken[1])


def test_under_ddp_the_clock_is_read_every_few_seconds_and_sooner_when_the_limit_is_near():
    clock = StepClock(time_limit_min=0, checkpoint_every_min=0, device=torch.device("cpu"), rank=0, world_size=2)
    now = time.perf_counter()
    clock.checked_at, clock.checked_step = now - 1.0, 100  # 100 steps in the last second
    assert clock._steps_to_next_check(200, now) == int(CHECK_EVERY_S * 100)
    clock.limit_s, clock.started_at = 60.0, now - 59.95  # 50 ms left: 5 steps (or 4, rounded down)
    assert clock._steps_to_next_check(200, now) in (4, 5)
    clock.limit_s = 0.0
    clock.checkpoint_s, clock.checkpointed_at = 60.0, now - 61.0  # overdue: the very next step
    assert clock._steps_to_next_check(200, now) == 1
    lone = StepClock(time_limit_min=0, checkpoint_every_min=0, device=torch.device("cpu"), rank=0, world_size=1)
    assert lone.check(5).stop is False and lone.next_check == 6  # one process: every step boundary, no collective
