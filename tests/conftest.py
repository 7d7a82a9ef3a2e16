"""Shared fixtures: the real composed config shrunk to seconds (`TINY`, `TINY_FILE`), one way to run `train.py` as a
user types it (`train_cli` to completion, `train_popen` for a test that signals it), tiny datasets, the shared data
folder, and a cache of the session's own (`SEQREC_CACHE`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
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
# one thread, W&B off and never a real W&B account (a test that wants W&B offline passes WANDB_MODE in `env`)
CLI_ENV = {key: value for key, value in os.environ.items() if key != "WANDB_API_KEY"}
CLI_ENV.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
CACHE_ENV = "SEQREC_CACHE"  # seqrec/utils/private_dir.py: processed datasets and compiled kernels


def pytest_configure(config):
    """The session's own cache, for the tests and the processes they start: the suite never writes into the user's
    ~/.cache/seqrec (the compiled kernels are built once per session in it)."""
    cache = Path(tempfile.mkdtemp(prefix="seqrec-test-cache-"))  # mode 0700, as the cache requires
    os.environ[CACHE_ENV] = CLI_ENV[CACHE_ENV] = str(cache)
    config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))


def train_command(*overrides: str, run_dir: Path | None = None, launcher: list | None = None) -> list[str]:
    """`python train.py <overrides> [hydra.run.dir=<run_dir>]`; `launcher` replaces `python` (e.g. torchrun)."""
    command = [*(launcher or [sys.executable]), str(REPO / "train.py"), *overrides]
    return command + ([f"hydra.run.dir={run_dir}"] if run_dir is not None else [])


def train_cli(
    *overrides: str,
    run_dir: Path | None = None,
    cwd: Path = REPO,
    timeout: float = 300,
    launcher: list | None = None,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """`train.py` in a subprocess as a user types it (`CLI_ENV`, plus `env`), run to its end. Returns the finished
    process, whatever its status."""
    command = train_command(*overrides, run_dir=run_dir, launcher=launcher)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=CLI_ENV | (env or {}))


def train_popen(
    *overrides: str,
    run_dir: Path | None = None,
    cwd: Path = REPO,
    launcher: list | None = None,
    env: dict | None = None,
) -> subprocess.Popen:
    """`train.py` started as a terminal starts it, for a test that signals it: its own process group with SIGINT at
    its default (a background shell ignores SIGINT and children inherit that). stdout is dropped, stderr is piped."""
    return subprocess.Popen(
        train_command(*overrides, run_dir=run_dir, launcher=launcher),
        cwd=cwd,
        env=CLI_ENV | (env or {}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The real `conf/train.yaml` composition with `overrides`; outputs under `output_dir`."""
    extra = []
    if output_dir is not None:
        extra = [f"trainer.output_dir={output_dir}", f"logger.output_dir={output_dir}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides) + extra)


@pytest.fixture(scope="session")
def built_kernels() -> None:
    """The C++ kernels built into the session's cache before a timed launch: a first build takes 10-40 s, which a
    test's tight stall or collective timeout would take for a hung rank."""
    from seqrec.kernels import mhc_cpu

    mhc_cpu.library()


@pytest.fixture
def tiny_cfg(tmp_path) -> DictConfig:
    return compose_config(TINY, tmp_path)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA
