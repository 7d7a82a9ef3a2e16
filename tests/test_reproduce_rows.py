"""bench/reproduce.py runs the experiment configs as they are: its command line adds only the seed, the device,
the run directory and the user's own overrides, and it accepts the older `--rows` spelling."""

from __future__ import annotations

import importlib.util
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

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


FAKE_RUN = """
import json, os, signal, sys, time
from pathlib import Path
folder, name, kills = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
with open(folder.parent.parent / "events.log", "a") as log:
    log.write(f"start {name}\\n")
tries = folder / "tries"
tries.write_text(str(int(tries.read_text()) + 1 if tries.exists() else 1))
if int(tries.read_text()) <= kills:
    time.sleep(0.3)  # the other run has started by now
    os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer does
time.sleep(0.5)
with open(folder.parent.parent / "events.log", "a") as log:
    log.write(f"end {name}\\n")
(folder / "results.json").write_text(json.dumps({}))
"""


def test_a_run_killed_by_sigkill_continues_once_after_another_run_ends(tmp_path, monkeypatch):
    """Two runs at once: the one the kernel kills waits for the other to end, then continues and finishes; a run
    killed again is reported with its status, not retried forever."""
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    kills = {"killed_once": 1, "healthy": 0, "killed_twice": 2}
    args = reproduce.parse_args(["--out", str(tmp_path / "out"), "--experiments", "ml100k_sasrec_ce"])
    monkeypatch.setattr(
        reproduce,
        "command",
        lambda name, seed, args: [
            sys.executable,
            str(script),
            str(reproduce.run_dir(name, seed, args)),
            name,
            str(kills[name]),
        ],  # fmt: skip
    )
    slots = reproduce.Slots()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda name: reproduce.run_one(name, 1, args, slots), ["killed_once", "healthy"]))
    assert [(name, code) for name, _, code, _ in results] == [("killed_once", 0), ("healthy", 0)]
    events = (tmp_path / "out" / "events.log").read_text().split("\n")
    assert events.index("end healthy") < len(events) - 1 - events[::-1].index("start killed_once")  # retried after
    assert (tmp_path / "out" / "killed_once" / "seed1" / "tries").read_text() == "2"
    name, _, code, _ = reproduce.run_one("killed_twice", 1, args, reproduce.Slots())  # alone: retried at once
    assert code == -signal.SIGKILL and (tmp_path / "out" / "killed_twice" / "seed1" / "tries").read_text() == "2"
