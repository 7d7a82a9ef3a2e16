"""Every row of bench/reproduce.py composes into a config the product accepts, so a typo in a row fails here
and not minutes into a lent GPU's budget."""

from __future__ import annotations

import importlib.util

import pytest

from seqrec.utils.config import check_config
from tests.conftest import REPO, compose_config

spec = importlib.util.spec_from_file_location("reproduce", REPO / "bench" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


@pytest.mark.parametrize("row", sorted(reproduce.ROWS))
def test_row_composes_into_a_valid_config(row, tmp_path):
    args = reproduce.argparse.Namespace(
        data=str(tmp_path), out=str(tmp_path / "out"), device="cpu", time_limit_min=0.0, extra=[]
    )
    command = reproduce.command(row, 1, args)
    overrides = [o for o in command[2:] if not o.startswith("hydra.")]
    cfg = compose_config(overrides, tmp_path / "run")
    check_config(cfg)
    assert cfg.seed == 1 and cfg.trainer.device == "cpu"
    assert cfg.trainer.amp == ("trainer.amp=true" in reproduce.ROWS[row])  # fp32 unless the row asks for autocast
    if "_ce" in row:
        assert cfg.loss._target_.endswith("CrossEntropy") and cfg.trainer.lr == 0.002
