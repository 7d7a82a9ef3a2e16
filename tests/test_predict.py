"""`python -m seqrec.predict`: top-k from the best checkpoint of a real (tiny) run, rebuilt from the config stored
with its weights (then run.json, results.json, legacy .hydra/config.yaml); k rows per user, never an item the user
has seen, titles where the dataset has them; only seqrec's own classes are built; bad input is one line, exit 1."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from seqrec.predict import main
from seqrec.run import run
from seqrec.train.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import TINY_FILE

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = ["hardware=cpu", *TINY_FILE, "model.maxlen=12", "model.hidden_units=16", "sampler.batch_size=32"]


def compose_run(run_dir: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[*TINY, *overrides, f"trainer.output_dir={run_dir}", f"logger.output_dir={run_dir}"],
        )


def train_run(run_dir: Path, overrides: list[str]) -> Path:
    """Train in-process and write run.json as seqrec records a run's first launch."""
    cfg = compose_run(run_dir, overrides)
    run_dir.mkdir(parents=True)
    write_record(run_dir, OmegaConf.to_container(cfg, resolve=True), overrides)
    run(cfg)
    return run_dir


def write_record(run_dir: Path, config: dict, overrides: list[str]) -> None:
    record = {
        "format": 1,
        "config": config,
        "overrides": overrides,
        "choices": {"model": "sasrec", "residual": "plain"},
        "created": "2026-01-01T10:00:00+00:00",
        "argv": ["train.py", *overrides],
    }
    (run_dir / "run.json").write_text(json.dumps(record))


def run_config(run_dir: Path):
    return OmegaConf.create(json.loads((run_dir / "run.json").read_text())["config"])


@pytest.fixture(scope="module")
def titled_run(tmp_path_factory) -> Path:
    """A run on a small `user item timestamp` file with a titles file (raw ids offset, to test the id mapping)."""
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    lines = []
    for u in range(40):
        items = rng.choice(np.arange(1, 31), size=rng.integers(5, 12), replace=False)
        lines += [f"{1000 + u} {100 + i} {1_000_000 + 3600 * t}" for t, i in enumerate(items)]
    (root / "interactions.txt").write_text("\n".join(lines) + "\n")
    (root / "titles.tsv").write_text("".join(f"{100 + i}\tMovie {i} (19{60 + i})\n" for i in range(1, 31)))
    return train_run(
        root / "run",
        ["dataset=file", f"dataset.path={root / 'interactions.txt'}", f"dataset.titles_path={root / 'titles.tsv'}"],
    )


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def known_items(run_dir: Path) -> dict[str, set[str]]:
    """Every (original) item each user has interacted with, from the raw interaction file."""
    cfg = run_config(run_dir)
    seen: dict[str, set[str]] = {}
    for line in Path(cfg.dataset.path).read_text().splitlines():
        user, item, _ = line.split()
        seen.setdefault(user, set()).add(item)
    return seen


def test_all_users_k_rows_no_history_with_titles(titled_run, tmp_path):
    out = tmp_path / "recs.csv"
    assert main([str(titled_run), "--all", "--k", "5", "--out", str(out)]) == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["user", "rank", "item", "score", "title"]
    seen = known_items(titled_run)
    by_user: dict[str, list[dict]] = {}
    for r in rows:
        by_user.setdefault(r["user"], []).append(r)
    assert set(by_user) == set(seen)
    for user, recs in by_user.items():
        assert [r["rank"] for r in recs] == ["1", "2", "3", "4", "5"]
        assert not {r["item"] for r in recs} & seen[user], f"{user} was recommended an item from their history"
        assert len({r["item"] for r in recs}) == 5
        scores = [float(r["score"]) for r in recs]
        assert scores == sorted(scores, reverse=True)
        for r in recs:
            n = int(r["item"]) - 100
            assert r["title"] == f"Movie {n} (19{60 + n})"


def test_selected_users_match_the_models_own_ranking(titled_run, tmp_path):
    out = tmp_path / "two.csv"
    assert main([str(titled_run), "--users", "1003", "1007", "--k", "3", "--out", str(out)]) == 0
    rows = read_csv(out)
    assert [r["user"] for r in rows] == ["1003"] * 3 + ["1007"] * 3
    # independent check: score every item with the best checkpoint through the model's own API

    cfg = run_config(titled_run)
    data = instantiate(cfg.dataset)
    model = instantiate(cfg.model, num_items=data.num_items)
    model.load_state_dict(load_checkpoint(titled_run / "checkpoints" / "best.pt")["model"])
    model.eval()
    u = int(np.flatnonzero(data.user_ids == 1003)[0])
    full = np.concatenate([data.user_history(u), [data.valid_item[u], data.test_item[u]]])
    times = np.concatenate(
        [data.train_times[data.train_ptr[u] : data.train_ptr[u + 1]], [data.valid_time[u], data.test_time[u]]]
    )
    with torch.no_grad():
        from seqrec.data.windows import user_time_scale

        scale = torch.from_numpy(user_time_scale(data)[[u]])
        h = model(torch.from_numpy(full[-12:][None]), torch.from_numpy(times[-12:][None]), scale)[:, -1]
        scores = model.head.score_all(h)[0]
    scores[torch.from_numpy(full - 1)] = -torch.inf
    expected = [str(data.item_ids[i + 1]) for i in torch.topk(scores, 3).indices.tolist()]
    assert [r["item"] for r in rows[:3]] == expected


def test_dataset_without_titles_has_no_title_column(tmp_path, capsys):
    run_dir = train_run(tmp_path / "run", ["dataset.num_users=60", "dataset.num_items=50"])
    assert main([str(run_dir), "--users", "0", "1", "--k", "4", "--out", "-"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "user,rank,item,score" and len(lines) == 1 + 2 * 4
    assert main([str(run_dir), "--k", "2"]) == 0  # default: every user, into the run directory
    assert len(read_csv(run_dir / "predictions.csv")) == 2 * 60


def one_line_error(capsys, argv: list[str]) -> str:
    """main(argv)'s stderr, asserted to be exit status 1 and a single `error: ...` line."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such directory"),
        ("empty", "not a run directory"),
        ("no_checkpoints", "no checkpoints/ folder"),
        ("no_best", "best.pt: checkpoint not found (has the run finished an evaluation? try --checkpoint last)"),
    ],
)
def test_clear_one_line_errors(tmp_path, capsys, case, message):
    target = tmp_path / case
    if case != "missing":
        target.mkdir()
    if case in ("no_checkpoints", "no_best"):
        write_record(target, {"seed": 1}, [])
    if case == "no_best":
        (target / "checkpoints").mkdir()
    assert message in one_line_error(capsys, [str(target)])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "nonsense"], "--device nonsense: expected cpu, cuda or cuda:N"),
        (["--device", "tpu"], "--device tpu: expected cpu, cuda or cuda:N"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--batch-size", "-5"], "--batch-size must be >= 1, got -5"),
        (["--k", "0"], "--k must be >= 1, got 0"),
        (["--k", "ten"], "argument --k: invalid int value: 'ten'"),
        (["--users", "1", "--all"], "not allowed with argument"),
    ],
)
def test_bad_arguments_are_one_line(titled_run, tmp_path, capsys, args, message):
    assert message in one_line_error(capsys, [str(titled_run), "--out", str(tmp_path / "r.csv"), *args])
    assert not (tmp_path / "r.csv").exists()


def test_cuda_on_a_machine_without_it_is_one_line(titled_run, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, as one without CUDA
    assert "torch sees no CUDA device" in one_line_error(capsys, [str(titled_run), "--device", "cuda", "--out", "-"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "has 1 CUDA device(s)" in one_line_error(capsys, [str(titled_run), "--device", "cuda:3", "--out", "-"])


def test_an_output_that_cannot_be_written_is_refused_before_the_model_runs(titled_run, tmp_path, capsys, monkeypatch):
    import seqrec.predict

    monkeypatch.setattr(seqrec.predict, "load_run", lambda *a: pytest.fail("the run was loaded before --out was"))
    assert "is a directory" in one_line_error(capsys, [str(titled_run), "--out", str(tmp_path)])
    (tmp_path / "a_file").write_text("x")
    under_a_file = tmp_path / "a_file" / "recs.csv"
    assert "cannot write there" in one_line_error(capsys, [str(titled_run), "--out", str(under_a_file)])
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert "cannot write there" in one_line_error(capsys, [str(titled_run), "--out", str(locked / "r.csv")])


def test_the_csv_is_written_atomically_and_replaces_an_old_one(titled_run, tmp_path):
    out = tmp_path / "recs.csv"
    out.write_text("an older file\n")
    assert main([str(titled_run), "--users", "1003", "--k", "2", "--out", str(out)]) == 0
    assert len(read_csv(out)) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["recs.csv"]


@pytest.fixture
def run_copy(titled_run, tmp_path) -> Path:
    """A copy of the trained run that a test may rewrite."""
    return Path(shutil.copytree(titled_run, tmp_path / "copy"))


def rewrite_checkpoint_config(run_dir: Path, config: dict | None) -> None:
    """Re-save best.pt with another stored config (None: none, as checkpoints from before configs were stored)."""
    path = run_dir / "checkpoints" / "best.pt"
    state = load_checkpoint(path)
    state.pop("config")
    save_checkpoint(state if config is None else {**state, "config": config}, path)


def poisoned(config: dict, key: str, target: str, marker: Path) -> dict:
    """`config` with `key`'s _target_ replaced by `target`, called with a shell command that creates `marker`."""
    config = json.loads(json.dumps(config))
    node = config
    for part in key.split("."):
        node = node[part]
    node["_target_"] = target
    node["_args_"] = [f"touch {marker}"]
    return config


FOREIGN_TARGETS = [
    ("dataset", "os.system"),
    ("dataset", "builtins.exec"),
    ("model", "torch.load"),
    ("model.residual", "os.system"),
    ("dataset", "seqrec.data.dataset.os.system"),  # through a module's imports
    ("dataset", "seqrec.predict.main"),  # seqrec's, but no dataset builder
    ("dataset", "seqrec.models.sasrec.SASRec"),  # seqrec's model class where a dataset is built
    ("model", "subprocess.getoutput"),
]


@pytest.mark.parametrize("key, target", FOREIGN_TARGETS)
def test_a_stored_config_naming_foreign_code_is_refused_in_one_line(run_copy, tmp_path, capsys, key, target):
    marker = tmp_path / "marker"
    config = load_checkpoint(run_copy / "checkpoints" / "best.pt")["config"]
    rewrite_checkpoint_config(run_copy, poisoned(config, key, target, marker))
    err = one_line_error(capsys, [str(run_copy), "--out", "-"])
    assert f"{key}._target_={target!r}" in err and "best.pt (its stored config)" in err
    assert not marker.exists()


@pytest.mark.parametrize("key, target", FOREIGN_TARGETS[:4])
def test_a_run_json_naming_foreign_code_is_refused_in_one_line(run_copy, tmp_path, capsys, key, target):
    marker = tmp_path / "marker"
    rewrite_checkpoint_config(run_copy, None)  # so that run.json is the config predict reads
    record = json.loads((run_copy / "run.json").read_text())
    write_record(run_copy, poisoned(record["config"], key, target, marker), [])
    err = one_line_error(capsys, [str(run_copy), "--out", "-"])
    assert f"run.json: {key}._target_={target!r}" in err and not marker.exists()


def test_an_interpolation_in_a_recorded_config_is_refused(run_copy, capsys):
    config = load_checkpoint(run_copy / "checkpoints" / "best.pt")["config"]
    config["dataset"]["path"] = "${oc.env:HOME}/interactions.txt"  # would be resolved from the environment
    rewrite_checkpoint_config(run_copy, config)
    err = one_line_error(capsys, [str(run_copy), "--out", "-"])
    assert "dataset.path='${oc.env:HOME}/interactions.txt' is an interpolation" in err


def test_the_checkpoints_own_config_wins_over_run_json(run_copy, capsys):
    record = json.loads((run_copy / "run.json").read_text())
    record["config"]["model"]["hidden_units"] = 64  # weights of hidden 16 would not fit this
    write_record(run_copy, record["config"], [])
    assert main([str(run_copy), "--users", "1003", "--k", "3", "--out", "-"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 3
    rewrite_checkpoint_config(run_copy, None)  # without a stored config, run.json is read, and does not fit
    assert "does not fit the model/data of" in one_line_error(capsys, [str(run_copy), "--out", "-"])


def test_a_legacy_run_rebuilds_from_its_hydra_config_yaml(run_copy, capsys, caplog):
    overrides = json.loads((run_copy / "run.json").read_text())["overrides"]
    rewrite_checkpoint_config(run_copy, None)
    (run_copy / "run.json").unlink()
    (run_copy / "checkpoints" / "best.pt.sha256").unlink()  # as written before digests
    (run_copy / ".hydra").mkdir()
    OmegaConf.save(compose_run(run_copy, overrides), run_copy / ".hydra" / "config.yaml")  # as Hydra wrote it
    assert "${residual}" in (run_copy / ".hydra" / "config.yaml").read_text()  # unresolved, as Hydra writes it
    assert main([str(run_copy), "--users", "1003", "--k", "3", "--out", "-"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 3
    assert any("loaded unverified" in r.getMessage() for r in caplog.records)


def test_unknown_user_is_a_clear_error(titled_run, capsys):
    assert main([str(titled_run), "--users", "1003", "nobody", "--out", "-"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown user id: nobody") and "\n" not in err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
