"""bench/reproduce.py runs the experiment configs as they are: its command line adds only the seed, the device,
the run directory and the user's own overrides, and it accepts the older `--rows` spelling."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import REPO, compose_config

spec = importlib.util.spec_from_file_location("reproduce", REPO / "bench" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def test_every_experiment_config_is_offered():
    assert reproduce.experiment_names() == sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
    assert "ml1m_sasrec_ce_h256_all_cosine" in reproduce.experiment_names()


def test_rows_is_an_alias_of_experiments(tmp_path):
    args = reproduce.parse_args(["--rows", "ml100k_sasrec_ce,bundled_sasrec_mhc", "--out", str(tmp_path)])
    assert args.experiments == ["ml100k_sasrec_ce", "bundled_sasrec_mhc"]
    assert reproduce.parse_args(["--out", str(tmp_path)]).experiments == reproduce.experiment_names()


def test_an_unknown_experiment_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--experiments", "ml1m_sasrec_typo"])
    assert "unknown experiments ['ml1m_sasrec_typo']" in capsys.readouterr().err


@pytest.mark.parametrize("time_limit, device", [(None, None), (5.0, "cpu")])
def test_the_command_composes_into_the_experiment_with_only_the_run_settings_changed(time_limit, device, tmp_path):
    args = reproduce.parse_args(["--out", str(tmp_path / "out"), "--seeds", "2", "trainer.num_epochs=3"])
    args.time_limit_min, args.device = time_limit, device
    command = reproduce.command("ml1m_sasrec_ce_h128", 2, args)
    assert command[1].endswith("train.py") and command[-1].startswith("hydra.run.dir=")
    cfg = compose_config(command[2:-1], tmp_path / "run")
    plain = compose_config(["experiment=ml1m_sasrec_ce_h128"], tmp_path / "run")
    assert cfg.seed == 2 and cfg.trainer.num_epochs == 3 and cfg.trainer.progress is False
    assert cfg.trainer.time_limit_min == (plain.trainer.time_limit_min if time_limit is None else time_limit)
    assert cfg.trainer.device == (plain.trainer.device if device is None else device)
    assert cfg.model.hidden_units == plain.model.hidden_units == 128  # everything else is the experiment's
