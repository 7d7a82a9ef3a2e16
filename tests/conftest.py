"""Shared fixtures: the real composed config shrunk to seconds, tiny datasets, the shared data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import seqrec.launch  # noqa: F401  (registers the ${seqrec.*:} config resolvers, as train.py does)

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
