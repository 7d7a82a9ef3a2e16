"""Shared fixtures: the real composed config shrunk to seconds (`TINY`, `TINY_FILE`), one way to run `train.py` as a
user types it (`train_cli`), tiny datasets, the shared data folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import seqrec.launch  # noqa: F401  (registers the ${seqrec.*:} config resolvers, as train.py does)
from seqrec.compose import set_deterministic_environment

# what the entry point does before any GPU work: tests that switch strict deterministic mode on in this process
# (rather than through train.py) need cuBLAS's fixed workspace from its first handle on
set_deterministic_environment(True)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SHARED_DATA = REPO.parent / "shared" / "data"

TINY = [
    "dataset.num_users=300",
    "dataset.num_items=200",
    "model.maxlen=30",
    "model.hidden_units=32",
    "trainer.num_epochs=2",
    "trainer.eval_every=1",
    "schedule.warmup_steps=0",
    "trainer.progress=false",
    "trainer.device=cpu",
    "eval.batch_size=128",
]

TINY_FILE = [o for o in TINY if not o.startswith("dataset.")]  # for dataset=file, which has no generator knobs
CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def train_cli(
    *overrides: str, run_dir: Path | None = None, cwd: Path = REPO, timeout: float = 300, launcher: list | None = None
) -> subprocess.CompletedProcess:
    """`python train.py <overrides> [hydra.run.dir=<run_dir>]` in a subprocess, as a user types it (one thread, W&B
    off); `launcher` replaces `python` (e.g. torchrun). Returns the finished process, whatever its status."""
    command = [*(launcher or [sys.executable]), str(REPO / "train.py"), *overrides]
    if run_dir is not None:
        command.append(f"hydra.run.dir={run_dir}")
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=CLI_ENV)


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The real `conf/train.yaml` composition with `overrides`; outputs under `output_dir`."""
    extra = []
    if output_dir is not None:
        extra = [f"trainer.output_dir={output_dir}", f"logger.output_dir={output_dir}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides) + extra)


@pytest.fixture
def tiny_cfg(tmp_path) -> DictConfig:
    return compose_config(TINY, tmp_path)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA
